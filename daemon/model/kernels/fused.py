"""Fused elementwise steps of a decoder layer in Triton, one launch each where eager torch
takes five to ten: residual add + RMSNorm; RoPE on Q and K + the K/V cache write; SiLU-and-
multiply. At decode batch sizes these launches, not their bytes, are what a layer costs.

Each computes in float32 and rounds to the model's dtype where the eager code rounds between
ops, so results match the eager path to within a rounding step (exactly in float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(
    H, DELTA, W, OUT, NEW_H, stride_h, stride_d, stride_o, stride_n, eps, width,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    h = tl.load(H + row * stride_h + cols, mask, 0.0)
    if HAS_DELTA:
        h = (h + tl.load(DELTA + row * stride_d + cols, mask, 0.0)).to(H.dtype.element_ty)
        tl.store(NEW_H + row * stride_n + cols, h, mask)
    x = h.to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, 0) / width + eps)
    normed = (x * scale).to(H.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask, 0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * normed).to(OUT.dtype.element_ty), mask)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h + delta), h + delta) for h, delta [T, width]; delta None: no add."""
    out = torch.empty_like(h)
    new_h = torch.empty_like(h) if delta is not None else h
    rows, width = h.shape
    _add_rms_norm[(rows,)](
        h, h if delta is None else delta, weight, out, new_h,
        h.stride(0), h.stride(0) if delta is None else delta.stride(0), out.stride(0),
        new_h.stride(0), eps, width,
        HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(width),
    )  # fmt: skip
    return out, new_h


@triton.jit
def _rope_store(
    QKV, POS, SLOTS, INV_FREQ, Q_NORM, K_NORM, Q_OUT, K_CACHE, V_CACHE,
    stride_t, stride_qo, stride_ks, stride_vs, eps,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    token, head = tl.program_id(0), tl.program_id(1)
    half = tl.arange(0, D // 2)
    src = QKV + token * stride_t + head * D
    lo = tl.load(src + half).to(tl.float32)
    hi = tl.load(src + D // 2 + half).to(tl.float32)
    slot = tl.load(SLOTS + token).to(tl.int64)
    if head >= Q_HEADS + KV_HEADS:  # V: straight into the cache
        dst = V_CACHE + slot * stride_vs + (head - Q_HEADS - KV_HEADS) * D
        tl.store(dst + half, lo.to(V_CACHE.dtype.element_ty))
        tl.store(dst + D // 2 + half, hi.to(V_CACHE.dtype.element_ty))
    else:
        if QK_NORM:  # Qwen3: RMSNorm over each head before the rotation
            norm = tl.where(head < Q_HEADS, Q_NORM, K_NORM)
            scale = tl.rsqrt((tl.sum(lo * lo, 0) + tl.sum(hi * hi, 0)) / D + eps)
            lo = (lo * scale).to(QKV.dtype.element_ty).to(tl.float32)
            hi = (hi * scale).to(QKV.dtype.element_ty).to(tl.float32)
            lo = (lo * tl.load(norm + half).to(tl.float32)).to(QKV.dtype.element_ty)
            hi = (hi * tl.load(norm + D // 2 + half).to(tl.float32)).to(QKV.dtype.element_ty)
            lo, hi = lo.to(tl.float32), hi.to(tl.float32)
        angle = tl.load(POS + token).to(tl.float32) * tl.load(INV_FREQ + half)
        cos, sin = tl.cos(angle), tl.sin(angle)
        out_lo, out_hi = lo * cos - hi * sin, hi * cos + lo * sin
        if head < Q_HEADS:
            dst = Q_OUT + token * stride_qo + head * D
            tl.store(dst + half, out_lo.to(Q_OUT.dtype.element_ty))
            tl.store(dst + D // 2 + half, out_hi.to(Q_OUT.dtype.element_ty))
        else:
            dst = K_CACHE + slot * stride_ks + (head - Q_HEADS) * D
            tl.store(dst + half, out_lo.to(K_CACHE.dtype.element_ty))
            tl.store(dst + D // 2 + half, out_hi.to(K_CACHE.dtype.element_ty))


def rope_store(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D]: q, k, v of each token, side by side
    positions: torch.Tensor,  # [T]
    slots: torch.Tensor,  # [T] cache slots of the tokens
    inv_freq: torch.Tensor,  # [D / 2] float32
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    q_heads: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotated Q [T, Hq, D]; rotated K and V written to the cache at `slots`."""
    tokens, kv_heads, dim = qkv.shape[0], k_cache.shape[1], k_cache.shape[2]
    q = torch.empty(tokens, q_heads, dim, dtype=qkv.dtype, device=qkv.device)
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (inv_freq, inv_freq, 0.0)
    _rope_store[(tokens, q_heads + 2 * kv_heads)](
        qkv, positions, slots, inv_freq, q_norm, k_norm, q, k_cache, v_cache,
        qkv.stride(0), q.stride(0), k_cache.stride(0), v_cache.stride(0), eps,
        Q_HEADS=q_heads, KV_HEADS=kv_heads, D=dim, QK_NORM=qk_norm is not None,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul(GATE_UP, OUT, stride_g, stride_o, width, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(GATE_UP + row * stride_g + cols, mask, 0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * stride_g + width + cols, mask, 0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (act * up).to(OUT.dtype.element_ty), mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 I] (gate columns first): [T, I]."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul[(rows, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block
    )
    return out
