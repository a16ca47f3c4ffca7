"""Paged attention in Triton: K and V are read through each sequence's page table, in place.

The cache of one layer is [slots, kv_heads, head_dim]; page `p` holds slots [p * page, (p + 1) *
page). A sequence's table row lists its pages in token order, so token `t` lives in slot
`table[t // page] * page + t % page` — any page size, pages anywhere in the cache.

Decode (one query token per sequence) splits each context over `splits` programs per KV head
(flash-decoding: one sequence at batch 1 would otherwise run on a handful of SMs), each program
serving the whole GQA group of query heads with one K/V read; a second kernel merges the splits
by their log-sum-exp. The grid depends only on the batch size, never on context lengths (each
program derives its share from the length on the device), so a captured CUDA graph replays for
any lengths.

Prefill is causal flash attention over the new tokens of each sequence, attending to every
earlier token of it in the cache (chunked prompts). Both accumulate in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DECODE_BLOCK = 64  # keys per step of a decode program
PREFILL_BLOCK_M, PREFILL_BLOCK_N = 64, 64


def _precision(dtype: torch.dtype) -> str:
    # float32 models (the tests') keep full precision; tf32 would round their scores
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_splits(batch: int, kv_heads: int, sms: int, max_splits: int = 32) -> int:
    """Splits per context so that a decode step fills the GPU about twice over."""
    want = -(-2 * sms // max(batch * kv_heads, 1))
    return max(1, min(max_splits, triton.next_power_of_2(want)))


@triton.jit
def _decode_split(
    Q, K, V, TABLE, LENS, PART_O, PART_LSE, scale,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, num_q_heads,
    PAGE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(LENS + b)
    share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * share
    end = tl.minimum(start + share, length)
    g, d = tl.arange(0, GROUP_PAD), tl.arange(0, D)
    heads, real = kvh * GROUP + g, g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], real[:, None], 0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(start, end, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        valid = t < end
        page = tl.load(TABLE + b * stride_tb + t // PAGE, valid, 0).to(tl.int64)
        slot = page * PAGE + t % PAGE
        k = tl.load(
            K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], valid[:, None], 0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(
            V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], valid[:, None], 0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        total = total * alpha + tl.sum(p, 1)
        m = m_new
    row = (b * num_q_heads + heads) * SPLITS + split  # [GROUP_PAD]
    seen = total > 0  # an empty split (context shorter than the splits) weighs nothing
    out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
    tl.store(PART_O + row[:, None] * D + d[None, :], out, real[:, None])
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(PART_LSE + row, lse, real)


@triton.jit
def _decode_merge(
    PART_O, PART_LSE, OUT, stride_ob, stride_oh, num_q_heads,
    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    b, h = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, SPLITS_PAD), tl.arange(0, D)
    rows = (b * num_q_heads + h) * SPLITS + s
    lse = tl.load(PART_LSE + rows, s < SPLITS, float("-inf"))
    weight = tl.exp(lse - tl.max(lse, 0))  # the first split is never empty: max is finite
    part = tl.load(PART_O + rows[:, None] * D + d[None, :], (s < SPLITS)[:, None], 0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    table: torch.Tensor,  # [B, W] int32 pages
    lengths: torch.Tensor,  # [B] int32, >= 1
    page_size: int,
    splits: int,
) -> torch.Tensor:
    """Attention of one query token per sequence over its whole context: [B, Hq, D]."""
    batch, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    part_o = torch.empty(batch, q_heads, splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    _decode_split[(batch, kv_heads, splits)](
        q, k_cache, v_cache, table, lengths, part_o, part_lse, dim**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), table.stride(0), q_heads,
        PAGE=page_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim,
        BLOCK=DECODE_BLOCK, SPLITS=splits, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    out = torch.empty_like(q)
    _decode_merge[(batch, q_heads)](
        part_o, part_lse, out, out.stride(0), out.stride(1), q_heads,
        SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), D=dim,
    )  # fmt: skip
    return out


@triton.jit
def _prefill(
    Q, K, V, OUT, TABLE, STARTS, LENS, scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
    stride_tb,
    PAGE: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq, h, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(STARTS + seq)
    count = tl.load(STARTS + seq + 1) - first  # new tokens of this sequence
    length = tl.load(LENS + seq)  # its context, new tokens included
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    real = rows < count
    pos = length - count + rows  # each query's position: it sees keys [0, pos]
    d = tl.arange(0, D)
    q = tl.load(
        Q + (first + rows)[:, None] * stride_qt + h * stride_qh + d[None, :], real[:, None], 0.0
    )
    kvh = h // GROUP
    # keys this block of queries can see; none when the block is past the sequence's new tokens
    end = tl.where(mb * BLOCK_M < count, tl.minimum(length, length - count + (mb + 1) * BLOCK_M), 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t0 in range(0, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        page = tl.load(TABLE + seq * stride_tb + t // PAGE, valid, 0).to(tl.int64)
        slot = page * PAGE + t % PAGE
        k = tl.load(
            K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], valid[:, None], 0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        # key 0 is visible to every query, so each row's max is finite from the first block on
        s = tl.where(valid[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(
            V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], valid[:, None], 0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        total = total * alpha + tl.sum(p, 1)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    where = OUT + (first + rows)[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(where, out.to(OUT.dtype.element_ty), real[:, None])


def paged_prefill(
    q: torch.Tensor,  # [T, Hq, D], the new tokens of every sequence, in order
    k_cache: torch.Tensor,  # [slots, Hkv, D], the new tokens' K already written
    v_cache: torch.Tensor,
    table: torch.Tensor,  # [S, W] int32 pages
    starts: torch.Tensor,  # [S + 1] int32: sequence s's new tokens are q[starts[s]:starts[s+1]]
    lengths: torch.Tensor,  # [S] int32 contexts, new tokens included
    page_size: int,
    max_new: int,  # the most new tokens of any sequence
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context: [T, Hq, D]."""
    _, q_heads, dim = q.shape
    out = torch.empty_like(q)
    grid = (table.shape[0], q_heads, triton.cdiv(max_new, PREFILL_BLOCK_M))
    _prefill[grid](
        q, k_cache, v_cache, out, table, starts, lengths, dim**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), table.stride(0),
        PAGE=page_size, GROUP=q_heads // k_cache.shape[1], D=dim,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return out
