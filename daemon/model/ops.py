"""The steps of a decoder layer that are not matrix products, in two interchangeable sets.

`TorchOps` is the eager reference: what CPUs run (and CI checks against transformers), and
what the kernels are checked against. `KernelOps` runs the same steps as Triton kernels on a
GPU: paged attention straight from the page table, and fused norm, RoPE + cache write and
SiLU-and-multiply — a handful of launches per layer, all capturable in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvferry.daemon.model import rope
from kvferry.daemon.model.batch import Batch


@dataclass(frozen=True)
class Heads:
    q: int  # query heads on this rank
    kv: int
    dim: int


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class TorchOps:
    def __init__(self, heads: Heads, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
        self.heads, self.inv_freq, self.dtype = heads, inv_freq, dtype

    def begin(self, batch: Batch) -> _TorchForward:
        """What every layer of this forward shares: RoPE tables, each context's slots."""
        cos, sin = rope.cos_sin(self.inv_freq, batch.positions, self.dtype)
        lengths = batch.lengths.tolist()
        if len(lengths) > 1 and batch.decode:
            return _TorchForward(batch, cos, sin, _padded_contexts(batch))
        starts = batch.starts.tolist()
        contexts = [(starts[s + 1] - starts[s], _slots(batch, s, n)) for s, n in enumerate(lengths)]
        return _TorchForward(batch, cos, sin, contexts)

    def add_norm(self, h, delta, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(h + delta), h + delta); delta None: (rms_norm(h), h)."""
        if delta is not None:
            h = h + delta
        return rms_norm(h, weight, eps), h

    def rope_store(self, qkv, forward, k_cache, v_cache, qk_norm=None) -> torch.Tensor:
        """Q [T, Hq, D] rotated; K rotated and V written to the cache at the batch's slots."""
        h = self.heads
        q, k, v = qkv.split([h.q * h.dim, h.kv * h.dim, h.kv * h.dim], dim=-1)
        q, k, v = q.view(-1, h.q, h.dim), k.view(-1, h.kv, h.dim), v.view(-1, h.kv, h.dim)
        if qk_norm is not None:
            q_weight, k_weight, eps = qk_norm
            q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
        q, k = rope.apply(q, forward.cos, forward.sin), rope.apply(k, forward.cos, forward.sin)
        slots = forward.batch.slots
        k_cache[slots], v_cache[slots] = k.to(k_cache.dtype), v.to(v_cache.dtype)
        return q

    def attend(self, q, k_cache, v_cache, forward) -> torch.Tensor:
        """[T, Hq * D]: each new token over its sequence's context."""
        if isinstance(forward.contexts, _Padded):
            return self._attend_padded(q, k_cache, v_cache, forward.contexts)
        out, start = [], 0
        for n, slots in forward.contexts:
            out.append(self._attend_one(q[start : start + n], k_cache[slots], v_cache[slots]))
            start += n
        return torch.cat(out).reshape(q.shape[0], -1)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _attend_padded(self, q, k_cache, v_cache, ctx: _Padded) -> torch.Tensor:
        """q [B, Hq, D], one token per sequence, over each one's padded context."""
        groups = self.heads.q // self.heads.kv
        k = k_cache[ctx.index].to(self.dtype).repeat_interleave(groups, dim=2)  # [B, C, H, D]
        v = v_cache[ctx.index].to(self.dtype).repeat_interleave(groups, dim=2)
        o = F.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.valid
        )
        return o.reshape(q.shape[0], -1)

    def _attend_one(self, q, k, v) -> torch.Tensor:
        """Causal attention of q [n, Hq, D] over one context k, v [ctx, Hkv, D]."""
        n, ctx, groups = q.shape[0], k.shape[0], self.heads.q // self.heads.kv
        keys = torch.arange(ctx, device=q.device)
        allowed = keys[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k = k.to(self.dtype).repeat_interleave(groups, dim=1)  # [ctx, Hq, D]
        v = v.to(self.dtype).repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed
        )
        return o.transpose(0, 1)


@dataclass
class _Padded:
    """Contexts of a decode batch: cache slots [B, longest] and which are real [B, 1, 1, C]."""

    index: torch.Tensor
    valid: torch.Tensor


@dataclass
class _TorchForward:
    batch: Batch
    cos: torch.Tensor
    sin: torch.Tensor
    contexts: _Padded | list[tuple[int, torch.Tensor]]


def _slots(batch: Batch, seq: int, length: int) -> torch.Tensor:
    """Cache slots of the first `length` tokens of sequence `seq`."""
    t = torch.arange(length, device=batch.table.device)
    return batch.table[seq, t // batch.page_size].long() * batch.page_size + t % batch.page_size


def _padded_contexts(batch: Batch) -> _Padded:
    longest = int(batch.lengths.max())
    t = torch.arange(longest, device=batch.table.device)
    columns = (t // batch.page_size).clamp(max=batch.table.shape[1] - 1)
    index = batch.table[:, columns].long() * batch.page_size + t % batch.page_size
    valid = t[None, :] < batch.lengths[:, None]
    return _Padded(torch.where(valid, index, 0), valid[:, None, None, :])


class KernelOps:
    """The same steps as Triton kernels (CUDA; or the Triton interpreter in tests)."""

    def __init__(self, heads: Heads, inv_freq: torch.Tensor, sms: int) -> None:
        from kvferry.daemon.model.kernels import attention, fused

        self.heads, self.inv_freq, self.sms = heads, inv_freq.float().contiguous(), sms
        self._attention, self._fused = attention, fused

    def begin(self, batch: Batch) -> _KernelForward:
        splits = self._attention.decode_splits(len(batch.last), self.heads.kv, self.sms)
        return _KernelForward(batch, splits)

    def add_norm(self, h, delta, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused.add_rms_norm(h, delta, weight, eps)

    def rope_store(self, qkv, forward, k_cache, v_cache, qk_norm=None) -> torch.Tensor:
        b = forward.batch
        return self._fused.rope_store(
            qkv, b.positions, b.slots, self.inv_freq, k_cache, v_cache, self.heads.q, qk_norm
        )

    def attend(self, q, k_cache, v_cache, forward) -> torch.Tensor:
        b, a = forward.batch, self._attention
        if b.decode:
            o = a.paged_decode(q, k_cache, v_cache, b.table, b.lengths, b.page_size, forward.splits)
        else:
            o = a.paged_prefill(q, k_cache, v_cache, b.table, b.starts, b.lengths, b.page_size,
                                b.max_new)  # fmt: skip
        return o.reshape(q.shape[0], -1)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._fused.silu_mul(gate_up)


@dataclass
class _KernelForward:
    batch: Batch
    splits: int  # decode: programs per context and KV head


def kernels_usable(heads: Heads, device: torch.device) -> str | None:
    """Why the kernels cannot run this model here, or None when they can."""
    if device.type != "cuda":
        return f"device {device} is not a GPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if heads.dim < 16 or heads.dim & (heads.dim - 1):
        return f"head_dim={heads.dim} is not a power of two >= 16"
    return None
