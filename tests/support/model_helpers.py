"""Tiny transformers checkpoints and greedy generation through the decoder, for the tests."""

from __future__ import annotations

import numpy as np
import torch

from kvferry.daemon.model.llama import Model, SeqBatch
from kvferry.staging.slots import token_slots


def greedy(model: Model, prompt: list[int], steps: int, page_size=4, chunk=5, seed=0) -> list[int]:
    """Chunked prefill, then one token per step, through a shuffled paged cache."""
    c = model.config
    total = len(prompt) + steps
    pages = np.random.default_rng(seed).permutation(-(-total // page_size) + 2)
    slots = token_slots(pages, page_size, 0, total)
    kv = torch.zeros(2 * c.num_hidden_layers, len(pages) * page_size, model.local_kv, c.head_dim)
    tokens = list(prompt)
    for start in range(0, len(prompt), chunk):
        end = min(start + chunk, len(prompt))
        logits = model.forward(
            torch.tensor(tokens[start:end]),
            torch.arange(start, end),
            [SeqBatch(end - start, slots[:end])],
            kv,
        )
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        pos = len(tokens) - 1
        logits = model.forward(
            torch.tensor(tokens[-1:]), torch.tensor([pos]), [SeqBatch(1, slots[: pos + 1])], kv
        )
    return tokens[len(prompt) :]


COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    tie_word_embeddings=False,
)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def checkpoint(tmp_path, variant):
    """A random tiny checkpoint saved by transformers itself: (the transformers model, its path)."""
    import transformers

    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    hf = getattr(transformers, model_cls)(config).eval()
    hf.save_pretrained(tmp_path / variant)
    return hf, tmp_path / variant


def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    """transformers' own greedy continuation of `prompt`."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=steps,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()
