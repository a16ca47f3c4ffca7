"""Next-token sampling: greedy, or temperature + top-p with a per-sequence seeded generator.

A draw that fails (non-finite logits) fails its own sequence, never the batch or the rank: every
TP rank computes the same logits and draws with the same seed, so the same sequence fails on
every rank and the ranks stay in step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvferry.daemon.engine.sequence import SamplingParams


@dataclass
class Sampled:
    """One token per row; `errors`: why the draw failed, by sequence id (its row then holds the
    greedy token, a placeholder the caller must not emit)."""

    tokens: list[int]
    errors: dict[int, str] = field(default_factory=dict)


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}  # per sequence, for seeded sampling

    def sample(self, logits: torch.Tensor, seqs) -> Sampled:
        """One token per row of `logits` [B, vocab] (float32), for the matching sequences."""
        result = Sampled(logits.argmax(dim=-1).tolist())
        for row, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                try:
                    result.tokens[row] = draw(logits[row], seq.params, self._generator(seq))
                except (RuntimeError, ValueError) as exc:  # torch reports bad input as these
                    result.errors[seq.id] = f"sampling failed: {exc}"
        return result

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


def draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token from softmax(logits / T) [vocab], restricted to the top-p nucleus. Safe for
    every finite T > 0: `logits - max` is 0 at the max and <= 0 elsewhere, so dividing by a tiny
    T gives 0 and -inf (never inf - inf = NaN) and a huge T gives ~0 everywhere (uniform); in
    float64 so that a T below float32's range is not rounded to 0 (0 / 0 = NaN)."""
    logits = logits.detach().to("cpu", torch.float64)
    top = float(logits.max())  # NaN when any logit is NaN
    if not math.isfinite(top):
        raise ValueError(f"logits are not finite (max {top})")
    scaled = (logits - top) / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top one
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
