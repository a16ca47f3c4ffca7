"""Model weights: a local Hugging Face checkpoint (safetensors) or a seeded random init,
sharded for one tensor-parallel rank."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from kvferry.daemon.model.config import ModelConfig
from kvferry.staging.plan import rank_heads


def full_weights(
    config: ModelConfig, path: str | Path | None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every tensor of the model under its Hugging Face name (float32 for the random init)."""
    if path is None:
        return dict(random_weights(config, seed))
    from safetensors.torch import load_file  # deferred: only checkpoints need it

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def random_weights(c: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The seeded random model, one float32 tensor at a time: a consumer that keeps only its
    shard in its own dtype never holds the whole model in float32 (32 GB for an 8B shape)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(shape, generator=gen).mul_(0.02)

    def ones(n):
        return torch.ones(n)

    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    yield "model.embed_tokens.weight", normal(c.vocab_size, c.hidden_size)
    yield "model.norm.weight", ones(c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", ones(c.hidden_size)
        yield p + "post_attention_layernorm.weight", ones(c.hidden_size)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            yield p + f"self_attn.{name}_proj.weight", normal(rows, c.hidden_size)
        yield p + "self_attn.o_proj.weight", normal(c.hidden_size, q)
        yield p + "mlp.gate_proj.weight", normal(c.intermediate_size, c.hidden_size)
        yield p + "mlp.up_proj.weight", normal(c.intermediate_size, c.hidden_size)
        yield p + "mlp.down_proj.weight", normal(c.hidden_size, c.intermediate_size)
        if c.qkv_bias:
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                yield p + f"self_attn.{name}_proj.bias", normal(rows)
        if c.qk_norm:
            yield p + "self_attn.q_norm.weight", ones(c.head_dim)
            yield p + "self_attn.k_norm.weight", ones(c.head_dim)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", normal(c.vocab_size, c.hidden_size)


class Shard:
    """Which rows/columns of each projection one TP rank holds."""

    def __init__(self, config: ModelConfig, tp_size: int, tp_rank: int) -> None:
        c = config
        if c.num_attention_heads % tp_size or c.intermediate_size % tp_size:
            raise ValueError(
                f"tp_size={tp_size} must divide num_attention_heads={c.num_attention_heads} "
                f"and intermediate_size={c.intermediate_size}"
            )
        per_rank = c.num_attention_heads // tp_size
        self.q_heads = range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
        self.kv_heads = rank_heads(c.num_key_value_heads, tp_size, tp_rank)  # validates tp_size
        inter = c.intermediate_size // tp_size
        self.inter = range(tp_rank * inter, (tp_rank + 1) * inter)
        self.head_dim = c.head_dim

    def rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's part of a weight or bias whose first dimension is split."""
        span = self._span(name)
        return tensor[span.start : span.stop].contiguous() if span is not None else tensor

    def columns(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        span = self._span(name)
        return tensor[:, span.start : span.stop].contiguous()

    def _span(self, name: str) -> range | None:
        d = self.head_dim
        if "q_proj" in name or "o_proj" in name:
            return range(self.q_heads.start * d, self.q_heads.stop * d)
        if "k_proj" in name or "v_proj" in name:
            return range(self.kv_heads.start * d, self.kv_heads.stop * d)
        if "gate_proj" in name or "up_proj" in name or "down_proj" in name:
            return self.inter
        return None
