"""Greedy generation through the decoder and a shuffled paged cache, for the model tests."""

from __future__ import annotations

import numpy as np
import torch

from kvferry.daemon.model import Model, SeqBatch
from kvferry.staging import token_slots


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
