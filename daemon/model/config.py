"""The model a daemon serves: a Llama-family decoder described by a Hugging Face config.json."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from kvferry.staging.layout import KVLayout

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class RopeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    rope_type: str = "default"  # default | linear | llama3
    rope_theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str = "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()  # config.json's eos_token_id: generation stops at each

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is not one of {ARCHITECTURES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type={self.rope.rope_type!r} is not supported")

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """From the fields of a Hugging Face config.json (transformers 4 or 5 spelling)."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=msgspec.convert(rope, RopeConfig),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        )

    def kv_layout(self, model: str, dtype: str, page_size: int, tp_size: int, tp_rank: int):
        """The KV layout one TP rank of this model holds (what peers check at registration)."""
        return KVLayout(
            model=model,
            num_layers=self.num_hidden_layers,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            page_size=page_size,
            tp_size=tp_size,
            tp_rank=tp_rank,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        try:
            return cls.from_hf(json.loads(file.read_text()))
        except (OSError, ValueError, KeyError, msgspec.ValidationError) as exc:
            raise ValueError(f"{file}: {exc}") from None


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
