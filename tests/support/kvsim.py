"""Simulated paged KV caches for the gather/scatter tests: one model's KV split over TP ranks."""

from __future__ import annotations

import numpy as np
import torch

from kvferry.staging.kv_copy import KVPlanes, gather, scatter
from kvferry.staging.plan import rank_heads
from kvferry.staging.slots import token_slots

# (KV heads, prefill TP, decode TP) pairs the transfer tests cover: fewer and more ranks on either
# side, and GQA replication (TP above the head count) on either side.
TP_PAIRS = [
    (4, 1, 1),
    (4, 2, 1),
    (4, 4, 1),
    (4, 1, 2),
    (4, 1, 4),
    (4, 2, 4),
    (4, 4, 2),
    (2, 4, 1),
    (2, 1, 4),
    (2, 4, 4),
]


def random_bits(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (NaN payloads included: the copies move bits)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).view(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


class PagedRank:
    """One rank's paged cache holding a request's tokens in shuffled pages."""

    def __init__(
        self, num_planes, num_tokens, heads, head_dim, dtype, page_size, seed, device="cpu"
    ):
        rng = np.random.default_rng(seed)
        num_pages = -(-num_tokens // page_size) + 3  # spare pages: slots the request does not use
        self.pages = rng.permutation(num_pages)[: -(-num_tokens // page_size)]
        self.slots = token_slots(self.pages, page_size, 0, num_tokens)
        shape = (num_planes, num_pages * page_size, heads, head_dim)
        self.cache = torch.zeros(shape, dtype=dtype, device=device)
        self.planes = KVPlanes.from_cache(self.cache)

    def fill(self, kv: torch.Tensor) -> None:
        """kv: [planes, tokens, heads, head_dim] in token order."""
        self.cache[:, torch.from_numpy(self.slots).to(self.cache.device)] = kv

    def read(self) -> torch.Tensor:
        return self.cache[:, torch.from_numpy(self.slots).to(self.cache.device)]


def tp_ranks(
    num_kv_heads,
    tp,
    num_planes,
    num_tokens,
    head_dim,
    dtype,
    page_size,
    seed,
    device="cpu",
    mla=False,
):
    ranks = []
    for r in range(tp):
        heads = 1 if mla else len(rank_heads(num_kv_heads, tp, r))
        ranks.append(
            PagedRank(num_planes, num_tokens, heads, head_dim, dtype, page_size, seed + r, device)
        )
    return ranks


def transfer(src_ranks, dst_ranks, plan, num_tokens, backend="auto"):
    """Move a request's KV from source to destination ranks through staging, slice by slice."""
    for s in plan:
        src, dst = src_ranks[s.src_rank], dst_ranks[s.dst_rank]
        staging = torch.empty(
            src.planes.staging_bytes(num_tokens, s.num_heads),
            dtype=torch.uint8,
            device=src.cache.device,
        )
        gather(src.planes, src.slots, s.src_head_start, s.num_heads, staging, backend=backend)
        scatter(staging, dst.planes, dst.slots, s.dst_head_start, s.num_heads, backend=backend)
