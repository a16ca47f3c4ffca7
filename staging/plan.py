"""Head-slice planning: which prefill rank sends which KV heads to which decode rank.

Pure functions of the two TP layouts. A TP group of size t over H KV heads places heads as:
  t <= H: rank r holds heads [r*H/t, (r+1)*H/t)
  t >  H: rank r holds the single head r // (t/H)   (each head replicated t/H times)
MLA caches hold one latent head that every rank keeps whole.
"""

from __future__ import annotations

import functools
from typing import NamedTuple


class HeadSlice(NamedTuple):
    """`num_heads` adjacent heads moving from one prefill rank to one decode rank.

    Head indices are rank-local: `src_head_start` indexes the source rank's cache,
    `dst_head_start` the destination rank's cache.
    """

    src_rank: int
    dst_rank: int
    src_head_start: int
    dst_head_start: int
    num_heads: int


def check_tp(num_kv_heads: int, tp_size: int) -> None:
    """Raise ValueError unless `tp_size` ranks can share `num_kv_heads` heads evenly."""
    if num_kv_heads < 1 or tp_size < 1:
        raise ValueError(f"num_kv_heads={num_kv_heads} and tp_size={tp_size} must both be >= 1")
    if tp_size <= num_kv_heads and num_kv_heads % tp_size:
        raise ValueError(f"num_kv_heads={num_kv_heads} is not divisible by tp_size={tp_size}")
    if tp_size > num_kv_heads and tp_size % num_kv_heads:
        raise ValueError(
            f"tp_size={tp_size} exceeds num_kv_heads={num_kv_heads} but is not a multiple of it"
        )


def rank_heads(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV heads that `rank` of a TP group of `tp_size` holds."""
    check_tp(num_kv_heads, tp_size)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank={rank} is outside a TP group of size {tp_size}")
    if tp_size <= num_kv_heads:
        per_rank = num_kv_heads // tp_size
        return range(rank * per_rank, (rank + 1) * per_rank)
    head = rank // (tp_size // num_kv_heads)
    return range(head, head + 1)


def head_holders(num_kv_heads: int, tp_size: int, head: int) -> range:
    """The ranks of a TP group that hold global `head`."""
    if tp_size <= num_kv_heads:
        return range(head // (num_kv_heads // tp_size), head // (num_kv_heads // tp_size) + 1)
    replicas = tp_size // num_kv_heads
    return range(head * replicas, (head + 1) * replicas)


def plan_head_transfers(
    num_kv_heads: int, src_tp: int, dst_tp: int, mla: bool = False
) -> list[HeadSlice]:
    """Every (source, destination, head range) transfer that fills every destination rank.

    Each destination rank receives every head it holds exactly once, from a source rank that
    holds it. Where several source ranks hold a head (source TP > heads), the destination ranks
    needing that head are dealt round-robin over its holders, so a homogeneous layout maps rank r
    to rank r. Slices are maximal: adjacent heads from one source to one destination are merged.
    Sorted by (dst_rank, dst_head_start).
    """
    if mla:
        return _plan_mla(num_kv_heads, src_tp, dst_tp)
    check_tp(num_kv_heads, src_tp)
    check_tp(num_kv_heads, dst_tp)
    needers_seen = [0] * num_kv_heads  # per head: destination ranks served so far
    slices: list[HeadSlice] = []
    for dst in range(dst_tp):
        dst_heads = rank_heads(num_kv_heads, dst_tp, dst)
        for dst_local, head in enumerate(dst_heads):
            holders = head_holders(num_kv_heads, src_tp, head)
            src = holders[needers_seen[head] % len(holders)]
            needers_seen[head] += 1
            src_local = head - rank_heads(num_kv_heads, src_tp, src).start
            _append_merged(slices, HeadSlice(src, dst, src_local, dst_local, 1))
    return slices


@functools.lru_cache(maxsize=256)
def cached_plan(num_kv_heads: int, src_tp: int, dst_tp: int, mla: bool = False) -> tuple:
    """plan_head_transfers, remembered per layout pair: a rank sees few distinct pairs, and a
    peer repeating one costs nothing (a tuple: shared by every caller, never changed)."""
    return tuple(plan_head_transfers(num_kv_heads, src_tp, dst_tp, mla))


def _append_merged(slices: list[HeadSlice], new: HeadSlice) -> None:
    if slices:
        last = slices[-1]
        if (
            last.src_rank == new.src_rank
            and last.dst_rank == new.dst_rank
            and last.src_head_start + last.num_heads == new.src_head_start
            and last.dst_head_start + last.num_heads == new.dst_head_start
        ):
            slices[-1] = last._replace(num_heads=last.num_heads + 1)
            return
    slices.append(new)


def _plan_mla(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadSlice]:
    if num_kv_heads != 1:
        raise ValueError(
            f"an MLA cache holds one latent head per rank, got num_kv_heads={num_kv_heads}"
        )
    if src_tp < 1 or dst_tp < 1:
        raise ValueError(f"src_tp={src_tp} and dst_tp={dst_tp} must both be >= 1")
    return [HeadSlice(dst % src_tp, dst, 0, 0, 1) for dst in range(dst_tp)]
