"""A Llama-family decoder (Llama, Qwen2, Qwen3) with tensor parallelism and a paged KV cache.

Each rank holds its share of the attention heads and MLP columns; the two row-parallel
projections (o_proj, down_proj) are summed over the TP group. KV for every layer lives in one
tensor per rank, [2 * layers, slots, local_kv_heads, head_dim] (K planes, then V planes), the
layout the transport gathers from and scatters into.

The projections that read the same input run as one product each (q/k/v, gate/up: their
weights are concatenated at load). Everything between the products is `ops`: the eager torch
reference on a CPU, Triton kernels on a GPU (see ops.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kvferry.daemon.model import rope
from kvferry.daemon.model.batch import Batch
from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.model.ops import Heads, KernelOps, TorchOps, kernels_usable, rms_norm
from kvferry.daemon.model.weights import Shard

log = logging.getLogger(__name__)

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class SeqBatch:
    """One sequence's part of a forward: its `num_new` tokens end its context of `len(slots)`.

    `slots`: cache slots of the whole context so far, new tokens included (host int64).
    """

    num_new: int
    slots: np.ndarray


@dataclass
class Forward:
    """A forward between its layers: the batch, what its layers share (`ops.begin`), the
    residual stream `h` and the last layer's output `delta` (None before the first layer)."""

    batch: Batch
    ops: object
    h: torch.Tensor
    delta: torch.Tensor | None


class Model:
    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        tp_size: int = 1,
        tp_rank: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        kernels: bool | None = None,  # None: on a GPU when they can run there
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,  # default: dist's
    ) -> None:
        self.config, self.tp_size = config, tp_size
        self._reduce = all_reduce
        self.shard = Shard(config, tp_size, tp_rank)
        self.device, self.dtype = torch.device(device), dtype
        named = weights.items() if isinstance(weights, Mapping) else weights
        self.w = _fuse({name: self._place(name, t) for name, t in named})
        if config.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.local_q = len(self.shard.q_heads)
        self.local_kv = len(self.shard.kv_heads)
        self.heads = Heads(self.local_q, self.local_kv, config.head_dim)
        inv_freq = rope.inverse_frequencies(config.rope, config.head_dim).to(self.device)
        self.ops = self._ops(inv_freq, kernels)

    def _place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor = self.shard.columns(name, tensor)
        elif "_proj" in name:
            tensor = self.shard.rows(name, tensor)
        return tensor.to(self.device, self.dtype)

    def _ops(self, inv_freq: torch.Tensor, kernels: bool | None) -> TorchOps | KernelOps:
        why_not = kernels_usable(self.heads, self.device)
        if kernels and why_not is not None:
            raise ValueError(f"the attention kernels cannot run: {why_not}")
        if kernels is False or why_not is not None:
            if self.device.type == "cuda":
                log.warning("eager attention on %s: %s", self.device, why_not or "asked for")
            return TorchOps(self.heads, inv_freq, self.dtype)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return KernelOps(self.heads, inv_freq, sms)

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
        """
        return self.run(self.slot_batch(tokens, positions, seqs), kv, after_layer)

    def slot_batch(self, tokens, positions, seqs: Sequence[SeqBatch]) -> Batch:
        """The Batch of `forward`'s arguments: each context's slots as a table of 1-slot pages."""
        lengths = np.array([len(seq.slots) for seq in seqs], dtype=np.int32)
        table = np.zeros((len(seqs), lengths.max()), dtype=np.int32)
        for row, seq in enumerate(seqs):
            table[row, : len(seq.slots)] = seq.slots
        counts = np.array([seq.num_new for seq in seqs])
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        new = np.concatenate([seq.slots[-seq.num_new :] for seq in seqs])
        up = self.upload
        return Batch(
            up(tokens), up(positions), up(new), up(starts[1:] - 1), up(table), up(lengths),
            up(starts), page_size=1, max_new=int(counts.max()),
        )  # fmt: skip

    @torch.inference_mode()
    def run(
        self, batch: Batch, kv: torch.Tensor, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Logits [sequences, vocab] (float32) of each sequence's last new token; writes the new
        tokens' KV into `kv`. after_layer: called with n once layers [0, n) are queued (to
        record events on)."""
        state, layers = self.embed(batch), self.config.num_hidden_layers
        if after_layer is None:
            self.layers(state, kv, 0, layers)
        else:
            for i in range(layers):
                self.layers(state, kv, i, i + 1)
                after_layer(i + 1)
        return self.head(state)

    # `run` in three parts, which CUDA graphs capture in layer groups (engine/prefill_graphs.py);
    # callers run them under torch.inference_mode(), as `run` does

    def embed(self, batch: Batch) -> Forward:
        """The forward's state before its first layer."""
        h = F.embedding(batch.tokens, self.w["model.embed_tokens.weight"])
        return Forward(batch, self.ops.begin(batch), h, None)

    def layers(self, state: Forward, kv: torch.Tensor, start: int, end: int) -> None:
        """Layers [start, end) of the forward, in place on `state`."""
        c, w, ops = self.config, self.w, self.ops
        h, delta = state.h, state.delta
        for i in range(start, end):
            p = f"model.layers.{i}."
            x, h = ops.add_norm(h, delta, w[p + "input_layernorm.weight"], c.rms_norm_eps)
            delta = self._attention(p, x, state.ops, kv, i)
            x, h = ops.add_norm(h, delta, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            delta = self._mlp(p, x)
        state.h, state.delta = h, delta

    def head(self, state: Forward) -> torch.Tensor:
        """Logits [sequences, vocab] (float32) at each sequence's last new token."""
        last, w = state.batch.last, self.w
        x, _ = self.ops.add_norm(state.h[last], state.delta[last], w["model.norm.weight"],
                                 self.config.rms_norm_eps)  # fmt: skip
        return (x @ w["lm_head.weight"].T).float()

    def upload(self, values: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Host values on the model's device without making the host wait: through pinned
        memory, asynchronously (the caching host allocator keeps the pinned block until the
        copy is done). Tensors already on the device pass through."""
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values)
        if self.device.type != "cuda" or values.device.type == "cuda":
            return values.to(self.device)
        return values.pin_memory().to(self.device, non_blocking=True)

    def _attention(self, p, x, forward, kv, layer) -> torch.Tensor:
        c, w = self.config, self.w
        qkv = self._linear(p + "self_attn.qkv_proj", x)
        qk_norm = None
        if c.qk_norm:
            qk_norm = (w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"])
            qk_norm = (*qk_norm, c.rms_norm_eps)
        k_cache, v_cache = kv[layer], kv[c.num_hidden_layers + layer]  # [slots, local_kv, D]
        q = self.ops.rope_store(qkv, forward, k_cache, v_cache, qk_norm)
        o = self.ops.attend(q, k_cache, v_cache, forward)
        return self._all_reduce(o @ w[p + "self_attn.o_proj.weight"].T)

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        act = self.ops.silu_mul(self._linear(p + "mlp.gate_up_proj", x))
        return self._all_reduce(act @ self.w[p + "mlp.down_proj.weight"].T)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        bias = self.w.get(name + ".bias")
        if bias is None:
            return x @ self.w[name + ".weight"].T
        return torch.addmm(bias, x, self.w[name + ".weight"].T)

    @property
    def reduce_capturable(self) -> bool:
        """Whether a CUDA graph can hold this rank's TP all-reduce: none (TP1), NCCL's, or one
        that the ranks sharing a GPU order on the device (shared_reduce.py)."""
        if self.tp_size == 1:
            return True
        if self._reduce is None:
            return dist.get_backend() == "nccl"
        return getattr(self._reduce, "capturable", False)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        if self._reduce is not None:
            return self._reduce(x)
        dist.all_reduce(x)
        return x


def _fuse(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate the weights (and biases) of projections that share an input, in place."""
    for name in [n for n in w if n.endswith(".q_proj.weight") or n.endswith(".gate_proj.weight")]:
        prefix = name.rsplit(".", 2)[0] + "."
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part in parts]
                if all(n in w for n in names):
                    w[f"{prefix}{fused}.{kind}"] = torch.cat([w.pop(n) for n in names])
    return w


__all__ = ["Forward", "Model", "SeqBatch", "rms_norm"]
