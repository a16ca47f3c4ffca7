"""Runs the model over a scheduled batch on one rank: builds the inputs from the sequences,
calls the forward, samples. Owns the rank's paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.sampler import Sampled, Sampler
from kvferry.daemon.engine.scheduler import Work
from kvferry.daemon.model.llama import Model, SeqBatch
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

    def forward(
        self,
        batch: list[Work],
        future: Future | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [len(batch), vocab] at the last token of each work item. A decode input whose
        token the host has not seen yet is taken from `future`, on the device. `after_layer`:
        see Model.forward."""
        tokens, positions, seqs, rows = [], [], [], []
        for work in batch:
            end = work.start + work.count
            known = min(end, work.seq.num_prompt + len(work.seq.output))
            tokens.extend(_token_range(work.seq, work.start, known))
            if known < end:  # one token in flight, sampled by the previous step
                tokens.append(0)
                rows.append((len(tokens) - 1, future.rows[work.seq.id]))
            positions.extend(range(work.start, end))
            seqs.append(SeqBatch(work.count, self.blocks.slots(work.seq.id, 0, end)))
        tokens = torch.tensor(tokens)
        if rows:
            tokens = self.model.upload(tokens)
            where, source = self.model.upload(np.array(rows, dtype=np.int64).T.copy())
            tokens[where] = future.tokens[source]
        return self.model.forward(tokens, torch.tensor(positions), seqs, self.kv, after_layer)

    def sample(self, logits: torch.Tensor, seqs) -> Sampled:
        return self.sampler.sample(logits, seqs)

    def sample_prompt_ends(self, batch: list[Work], logits: torch.Tensor) -> Future | None:
        """`sample_async` for the work items that complete their prompt (their first token);
        None when no item does."""
        rows = [i for i, work in enumerate(batch) if work.completes_prompt]
        if not rows:
            return None
        return self.sample_async(logits[rows], [batch[i] for i in rows])

    def sample_async(self, logits: torch.Tensor, batch: list[Work]) -> Future:
        """Sample without waiting for the device: the tokens stay on it (for the next step's
        inputs) and are copied to pinned host memory, ready once `event` fires."""
        seqs, errors = [work.seq for work in batch], {}
        if any(seq.params.temperature > 0 for seq in seqs):  # sampling draws on the host
            sampled = self.sampler.sample(logits, seqs)
            tokens, errors = self.model.upload(torch.tensor(sampled.tokens)), sampled.errors
        else:
            tokens = logits.argmax(dim=-1)
        rows = {seq.id: row for row, seq in enumerate(seqs)}
        if tokens.device.type != "cuda":
            return Future(batch, tokens, rows, tokens, None, errors)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event(blocking=True)  # waiting on it sleeps in the driver
        event.record()
        return Future(batch, tokens, rows, host, event, errors)


@dataclass
class Future:
    """Tokens one step sampled: on the device (`tokens`, row per sequence id) and, once `event`
    has fired, on the host (`host`). `errors`: sequences whose draw failed (Sampled.errors);
    their rows hold placeholders."""

    batch: list[Work]
    tokens: torch.Tensor
    rows: dict[int, int]
    host: torch.Tensor
    event: torch.cuda.Event | None
    errors: dict[int, str] = field(default_factory=dict)

    def result(self) -> list[int]:
        """The host tokens, once their copy is done (the device meanwhile runs the step queued
        after this one). The wait sleeps in a blocking-sync event with the GIL released: no
        spinning, and the transfer thread runs meanwhile."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _token_range(seq, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without building the whole list per step."""
    prompt = seq.prompt[start:end]
    if end <= seq.num_prompt:
        return prompt
    return prompt + seq.output[max(start - seq.num_prompt, 0) : end - seq.num_prompt]
