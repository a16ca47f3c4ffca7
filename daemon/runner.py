"""Runs the model over a scheduled batch on one rank: builds the inputs from the sequences,
calls the forward, samples. Owns the rank's paged KV cache."""

from __future__ import annotations

import torch

from kvferry.daemon.block_manager import BlockManager
from kvferry.daemon.model import Model, SeqBatch
from kvferry.daemon.sampler import Sampler
from kvferry.daemon.scheduler import Work
from kvferry.staging.kv_copy import KVPlanes


class ModelRunner:
    def __init__(
        self, model: Model, blocks: BlockManager, kv_dtype: torch.dtype | None = None
    ) -> None:
        c = model.config
        self.model, self.blocks = model, blocks
        slots = blocks.num_pages * blocks.page_size
        shape = (2 * c.num_hidden_layers, slots, model.local_kv, c.head_dim)  # K planes, V planes
        self.kv = torch.zeros(shape, dtype=kv_dtype or model.dtype, device=model.device)
        self.planes = KVPlanes.from_cache(self.kv)
        self.sampler = Sampler()

    def forward(self, batch: list[Work]) -> torch.Tensor:
        """Logits [len(batch), vocab] at the last token of each work item."""
        tokens, positions, seqs = [], [], []
        for work in batch:
            end = work.start + work.count
            tokens.extend(_token_range(work.seq, work.start, end))
            positions.extend(range(work.start, end))
            seqs.append(SeqBatch(work.count, self.blocks.slots(work.seq.id, 0, end)))
        return self.model.forward(torch.tensor(tokens), torch.tensor(positions), seqs, self.kv)

    def sample(self, logits: torch.Tensor, seqs) -> list[int]:
        return self.sampler.sample(logits, seqs)


def _token_range(seq, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without building the whole list per step."""
    prompt = seq.prompt[start:end]
    if end <= seq.num_prompt:
        return prompt
    return prompt + seq.output[max(start - seq.num_prompt, 0) : end - seq.num_prompt]
