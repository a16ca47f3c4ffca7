"""Next-token sampling: greedy, or temperature + top-p with a per-sequence seeded generator —
on the host (`sample`), or on the GPU without a host round trip (`sample_on_device`).

A draw that fails (non-finite logits) fails its own sequence, never the batch or the rank: every
TP rank computes the same logits and draws with the same seed, so the same sequence fails on
every rank and the ranks stay in step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
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
        self._device_generators: dict[int, torch.Generator] = {}  # the same, on the GPU

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

    def sample_on_device(self, logits: torch.Tensor, seqs, upload) -> tuple[torch.Tensor, ...]:
        """(tokens [B] int64, failed [B] bool or None when no row draws), both on the logits'
        device, nothing read back: greedy rows by argmax, the others drawn by `draw_batch`
        with noise from their own seeded device generators. `upload`: int32 arrays to the
        device (the runner's Uploader)."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, seq in enumerate(seqs) if seq.params.temperature > 0]
        if not rows:
            return tokens, None
        drawn = [seqs[i] for i in rows]
        knobs = np.array([[s.params.temperature, s.params.top_p] for s in drawn], np.float32)
        where, knobs = upload(np.array(rows, np.int32), knobs.view(np.int32))
        where, knobs = where.long(), knobs.view(torch.float32)
        noise = torch.empty(len(rows), logits.shape[-1], dtype=torch.float64, device=logits.device)
        for row, seq in enumerate(drawn):
            noise[row].exponential_(generator=self._generator(seq, noise.device))
        choice, finite = draw_batch(logits[where], knobs[:, 0], knobs[:, 1], noise)
        tokens[where] = choice
        failed = torch.zeros_like(tokens, dtype=torch.bool)
        failed[where] = ~finite
        return tokens, failed

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)
        self._device_generators.pop(seq_id, None)

    def _generator(self, seq, device: torch.device | None = None) -> torch.Generator:
        on_host = device is None or device.type == "cpu"
        generators = self._generators if on_host else self._device_generators
        gen = generators.get(seq.id)
        if gen is None:
            gen = torch.Generator(device or "cpu")
            if seq.params.seed is not None:
                gen.manual_seed(seq.params.seed)
            else:
                gen.seed()
            generators[seq.id] = gen
        return gen


def draw_batch(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [R], finite [R]) for logits [R, vocab]: one draw per row from softmax(logits / T)
    restricted to its top-p nucleus, by the exponential race — argmax of p / E with E ~ Exp(1)
    (`noise`, [R, vocab]) picks token i with probability p_i. In float64, safe for every T > 0
    as `draw` is; a row whose logits are not finite comes out `finite` False (its token is a
    placeholder)."""
    x = logits.double()
    top = x.max(dim=-1, keepdim=True).values  # NaN when any logit is NaN
    finite = torch.isfinite(top).squeeze(-1)
    scale = temperature.double().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    probs = torch.where(finite[:, None], (x - top) / scale, 0.0).softmax(dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    keep = ordered.cumsum(dim=-1) - ordered < top_p.double()[:, None]  # always keeps the top
    probs = torch.zeros_like(probs).scatter_(-1, order, ordered * keep)
    race = probs / noise.clamp_min(torch.finfo(torch.float64).tiny)
    return race.argmax(dim=-1), finite


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
