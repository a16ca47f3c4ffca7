"""A Llama-family decoder (Llama, Qwen2, Qwen3) with tensor parallelism and a paged KV cache.

Each rank holds its share of the attention heads and MLP columns; the two row-parallel
projections (o_proj, down_proj) are summed over the TP group. KV for every layer lives in one
tensor per rank, [2 * layers, slots, local_kv_heads, head_dim] (K planes, then V planes), the
layout the transport gathers from and scatters into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kvferry.daemon.model import rope
from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.model.weights import Shard


@dataclass
class SeqBatch:
    """One sequence's part of a forward: its `num_new` tokens end its context of `len(slots)`.

    `slots`: cache slots of the whole context so far, new tokens included (host int64).
    """

    num_new: int
    slots: np.ndarray


@dataclass
class DecodeContext:
    """Contexts of a decode batch: cache slots [B, longest] (padded) and which are real
    ([B, 1, 1, longest], the attention mask)."""

    index: torch.Tensor
    valid: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class Model:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        tp_size: int = 1,
        tp_rank: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> None:
        self.config, self.tp_size = config, tp_size
        self.shard = Shard(config, tp_size, tp_rank)
        self.device, self.dtype = torch.device(device), dtype
        self.w = {name: self._place(name, t) for name, t in weights.items()}
        if config.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.inv_freq = rope.inverse_frequencies(config.rope, config.head_dim).to(self.device)
        self.local_q = len(self.shard.q_heads)
        self.local_kv = len(self.shard.kv_heads)

    def _place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor = self.shard.columns(name, tensor)
        elif "_proj" in name:
            tensor = self.shard.rows(name, tensor)
        return tensor.to(self.device, self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        seqs: Sequence[SeqBatch],
        kv: torch.Tensor,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [len(seqs), vocab] of each sequence's last token; writes the new tokens' KV.

        tokens, positions: [T] for the new tokens of every sequence, in `seqs` order.
        kv: this rank's cache [2 * layers, slots, local_kv_heads, head_dim].
        after_layer: called with n once layers [0, n) are queued (to record events on).
        """
        c = self.config
        h = F.embedding(self.upload(tokens), self.w["model.embed_tokens.weight"])
        cos, sin = rope.cos_sin(self.inv_freq, self.upload(positions), self.dtype)
        new_slots = self.upload(np.concatenate([s.slots[-s.num_new :] for s in seqs]))
        if len(seqs) > 1 and all(seq.num_new == 1 for seq in seqs):
            contexts = self._decode_context(seqs)  # shared by every layer
        else:
            contexts = [self._context(seq) for seq in seqs]
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = rms_norm(h, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
            h = h + self._attention(p, x, cos, sin, contexts, kv, i, new_slots)
            x = rms_norm(h, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            h = h + self._mlp(p, x)
            if after_layer is not None:
                after_layer(i + 1)
        ends = self.upload(np.cumsum([s.num_new for s in seqs]) - 1)
        last = rms_norm(h[ends], self.w["model.norm.weight"], c.rms_norm_eps)
        return (last @ self.w["lm_head.weight"].T).float()

    def _decode_context(self, seqs: Sequence[SeqBatch]) -> DecodeContext:
        """One new token per sequence: every context padded to the longest, in one index."""
        lengths = np.array([len(seq.slots) for seq in seqs])
        index = np.zeros((len(seqs), lengths.max()), dtype=np.int64)  # padding reads slot 0
        for row, seq in enumerate(seqs):
            index[row, : len(seq.slots)] = seq.slots
        index, lengths = self.upload(index), self.upload(lengths)
        keys = torch.arange(index.shape[1], device=self.device)
        return DecodeContext(index, (keys[None, :] < lengths[:, None])[:, None, None, :])

    def _context(self, seq: SeqBatch) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(new tokens, context slots [ctx], causal mask [new, ctx]) of one sequence."""
        n, ctx = seq.num_new, len(seq.slots)
        keys = torch.arange(ctx, device=self.device)
        allowed = keys[None, :] <= torch.arange(ctx - n, ctx, device=self.device)[:, None]
        return n, self.upload(seq.slots), allowed

    def upload(self, values: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Host values on the model's device without making the host wait: through pinned
        memory, asynchronously (the caching host allocator keeps the pinned block until the
        copy is done). Tensors already on the device pass through."""
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values)
        if self.device.type != "cuda" or values.device.type == "cuda":
            return values.to(self.device)
        return values.pin_memory().to(self.device, non_blocking=True)

    def _attention(self, p, x, cos, sin, contexts, kv, layer, new_slots) -> torch.Tensor:
        c, d = self.config, self.config.head_dim
        q = self._linear(p + "self_attn.q_proj", x).view(-1, self.local_q, d)
        k = self._linear(p + "self_attn.k_proj", x).view(-1, self.local_kv, d)
        v = self._linear(p + "self_attn.v_proj", x).view(-1, self.local_kv, d)
        if c.qk_norm:
            q = rms_norm(q, self.w[p + "self_attn.q_norm.weight"], c.rms_norm_eps)
            k = rms_norm(k, self.w[p + "self_attn.k_norm.weight"], c.rms_norm_eps)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        k_cache, v_cache = kv[layer], kv[c.num_hidden_layers + layer]  # [slots, local_kv, D]
        k_cache[new_slots], v_cache[new_slots] = k.to(kv.dtype), v.to(kv.dtype)
        if isinstance(contexts, DecodeContext):
            o = self._attend_decode(q, k_cache, v_cache, contexts)
            return self._all_reduce(o @ self.w[p + "self_attn.o_proj.weight"].T)
        out, start = [], 0
        for n, index, allowed in contexts:
            out.append(self._attend(q[start : start + n], k_cache[index], v_cache[index], allowed))
            start += n
        o = torch.cat(out).reshape(-1, self.local_q * d)
        return self._all_reduce(o @ self.w[p + "self_attn.o_proj.weight"].T)

    def _attend_decode(self, q, k_cache, v_cache, ctx: DecodeContext) -> torch.Tensor:
        """q [B, local_q, D], one token per sequence, over each one's padded context."""
        groups = self.local_q // self.local_kv
        k = k_cache[ctx.index].to(self.dtype).repeat_interleave(groups, dim=2)  # [B, C, H, D]
        v = v_cache[ctx.index].to(self.dtype).repeat_interleave(groups, dim=2)
        o = F.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.valid
        )
        return o.reshape(q.shape[0], -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed) -> torch.Tensor:
        """Causal attention of `q` [n, local_q, D] over one sequence's context k, v [ctx, kv, D]."""
        groups = self.local_q // self.local_kv
        k = k.to(self.dtype).repeat_interleave(groups, dim=1)  # [ctx, local_q, D]
        v = v.to(self.dtype).repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed
        )
        return o.transpose(0, 1)

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        gate = self._linear(p + "mlp.gate_proj", x)
        up = self._linear(p + "mlp.up_proj", x)
        return self._all_reduce((F.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x)
        return x
