"""GGUF files (llama.cpp's format) as a model source: a Llama-architecture GGUF is converted into
a Hugging Face directory — config.json, generation_config.json, model.safetensors (float32,
dequantized), tokenizer.json and tokenizer_config.json — that the rest of kvferry reads as any
checkpoint. `daemon/model/source.py` decides when and where (once, into the cache)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# GGUF tensor name -> Hugging Face name; `{}` is the layer index
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

# Llama 3's pre-tokenizer split; "gpt2" and "smollm" use byte-level BPE's own (GPT-2) regex,
# "smollm" after splitting digits one by one (as llama.cpp does for each `tokenizer.ggml.pre`)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe")
CONTROL, USER_DEFINED = 3, 4  # gguf token types that are added tokens


def convert(gguf_file: Path, out: Path, progress: Callable[[str], None] = print) -> None:
    """Write the Hugging Face directory for `gguf_file` into `out` (which exists and is empty);
    ValueError naming what is not supported (an architecture, a tokenizer, a tensor)."""
    import gguf  # deferred: only GGUF sources need it

    reader = gguf.GGUFReader(gguf_file)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    config = _config(gguf_file, meta, reader)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    progress(f"{gguf_file.name}: tokenizer ({meta.get('tokenizer.ggml.pre', 'default')} BPE)")
    tokenizer(meta).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
    progress(f"{gguf_file.name}: dequantizing {len(reader.tensors)} tensors to float32")
    from safetensors.torch import save_file

    save_file(dict(hf_tensors(reader, config)), str(out / "model.safetensors"))


def read_config(gguf_file: Path) -> dict:
    """config.json's fields from the file's metadata alone (no tensor is read)."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    meta = {
        name: field.contents()
        for name, field in reader.fields.items()
        if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    }
    if "tokenizer.ggml.tokens" in reader.fields:
        meta.setdefault("llama.vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))
    return _config(gguf_file, meta, reader)


def _config(gguf_file: Path, meta: dict, reader) -> dict:
    try:
        return hf_config(meta, tied=all(t.name != "output.weight" for t in reader.tensors))
    except ValueError as exc:
        raise ValueError(f"{gguf_file}: {exc}") from None


def hf_config(meta: dict, tied: bool) -> dict:
    """config.json's fields from the GGUF metadata of a Llama model."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"architecture {arch!r} is not supported (only 'llama')")

    def key(name: str, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata has no llama.{name}")
        return value

    if "llama.rope.scaling.type" in meta:
        raise ValueError(f"GGUF rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def hf_tensors(reader, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under its Hugging Face name, dequantized to float32. llama.cpp stores the
    rows of q and k interleaved for its rotary kernel; they are put back in HF order here."""
    import torch  # deferred: `kvferry config check` reads the metadata without torch
    from gguf import quants

    names = {}
    for gguf_name, hf_name in TENSOR_NAMES.items():
        for i in range(config["num_hidden_layers"]) if "{}" in gguf_name else [None]:
            names[gguf_name.format(i)] = hf_name.format(i)
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise ValueError(f"GGUF tensor {tensor.name!r} is not part of a Llama model")
        data = quants.dequantize(tensor.data, tensor.tensor_type)
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(tuple(reversed(tensor.shape)))
        if tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            data = unpermute(data, config["num_attention_heads"])
        elif tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            data = unpermute(data, config["num_key_value_heads"])
        yield names[tensor.name], torch.from_numpy(data.copy())


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of a q/k projection: per head, its rows go from
    (half, pair) order back to (pair-of-halves) order. w: [heads * head_dim, ...]."""
    rest = w.shape[1:]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE)")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not one of {PRE_TOKENIZERS}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    if pre == "llama-bpe":
        steps = [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    added = [
        AddedToken(tokens[i], special=token_type == CONTROL, normalized=False)
        for i, token_type in enumerate(types)
        if token_type in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)
    if meta.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta:
        from tokenizers.processors import TemplateProcessing

        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])]
        )
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: the special tokens and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    config = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
