"""Next-token sampling: greedy, or temperature + top-p with a per-sequence seeded generator."""

from __future__ import annotations

import torch

from kvferry.daemon.sequence import SamplingParams


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}  # per sequence, for seeded sampling

    def sample(self, logits: torch.Tensor, seqs) -> list[int]:
        """One token per row of `logits` [B, vocab] (float32), for the matching sequences."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                tokens[row] = self._draw(logits[row], seq.params, self._generator(seq))
        return tokens

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq) -> torch.Generator:
        gen = self._generators.get(seq.id)
        if gen is None:
            gen = torch.Generator()
            if seq.params.seed is not None:
                gen.manual_seed(seq.params.seed)
            else:
                gen.seed()
            self._generators[seq.id] = gen
        return gen

    @staticmethod
    def _draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top one
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=gen))
