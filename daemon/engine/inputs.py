"""A forward's inputs, from the scheduled work to tensors on the device: built with numpy from
the sequences' page tables (no per-step slot lists of whole contexts) and uploaded in one copy
through reused pinned buffers (no per-step pinned allocations)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.scheduler import Work


@dataclass
class HostInputs:
    """One forward's inputs on the host, every array int32."""

    tokens: np.ndarray  # [T]; a token still on the device (sampled by the step before) is 0
    positions: np.ndarray  # [T]
    counts: np.ndarray  # [S] new tokens per sequence
    table: np.ndarray  # [S, W] pages of each context
    pending: np.ndarray  # [2, P]: rows of `tokens` to fill from the previous step's sample rows

    @property
    def lengths(self) -> np.ndarray:
        return self.positions[np.cumsum(self.counts) - 1] + 1

    @property
    def decode(self) -> bool:
        return bool((self.counts == 1).all())


def host_inputs(batch: list[Work], blocks: BlockManager, sample_rows: dict[int, int]) -> HostInputs:
    """`sample_rows`: row of each sequence in the previous step's sample, for a token the host
    has not seen yet (decode, one step after it was sampled)."""
    tokens, counts, ends, pending, tables = [], [], [], [], []
    for work in batch:
        seq, end = work.seq, work.start + work.count
        known = min(end, seq.num_prompt + len(seq.output))
        tokens.extend(_token_range(seq, work.start, known))
        if known < end:  # one token in flight, sampled by the previous step
            tokens.append(0)
            pending.append((len(tokens) - 1, sample_rows[seq.id]))
        counts.append(work.count)
        ends.append(end)
        tables.append(blocks.table(seq.id))
    counts_np, ends_np = np.array(counts, np.int32), np.array(ends, np.int32)
    positions = np.repeat(ends_np - counts_np, counts_np) + _ranks(counts_np)
    pages = -(-ends_np // blocks.page_size)
    table = np.zeros((len(batch), pages.max()), dtype=np.int32)
    for row, (pages_of, used) in enumerate(zip(tables, pages, strict=True)):
        table[row, :used] = pages_of[:used]
    pending_np = np.array(pending, dtype=np.int32).reshape(-1, 2).T.copy()
    return HostInputs(np.array(tokens, np.int32), positions, counts_np, table, pending_np)


def new_slots(inputs: HostInputs, page_size: int) -> np.ndarray:
    """[T] cache slots of the new tokens."""
    rows = np.repeat(np.arange(len(inputs.counts)), inputs.counts)
    pos = inputs.positions
    return inputs.table[rows, pos // page_size] * page_size + pos % page_size


def _ranks(counts: np.ndarray) -> np.ndarray:
    """[sum(counts)]: 0..count-1 for each count in turn."""
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return (np.arange(counts.sum(), dtype=np.int32) - starts).astype(np.int32)


def _token_range(seq, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without building the whole list per step."""
    prompt = seq.prompt[start:end]
    if end <= seq.num_prompt:
        return prompt
    return prompt + seq.output[max(start - seq.num_prompt, 0) : end - seq.num_prompt]


class Uploader:
    """Int32 arrays to the device in one copy, through two pinned buffers taken in turn: the
    host fills one while the copy out of the other may still be queued. Before a buffer is
    refilled, its last copy must be done (an event; by then it nearly always is)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)) for a in arrays]
        turn, self._turn = self._turn, self._turn ^ 1
        total = sum(a.size for a in arrays)
        buffer = self._buffers[turn]
        if buffer is None or buffer.numel() < total:  # the old one is freed once copied
            buffer = torch.empty(max(total, 4096) * 2, dtype=torch.int32, pin_memory=True)
            self._buffers[turn] = buffer
        elif self._copied[turn] is not None:
            self._copied[turn].synchronize()
        host, offset, places = buffer.numpy(), 0, []
        for a in arrays:
            host[offset : offset + a.size] = a.ravel()
            places.append((offset, a.shape))
            offset += a.size
        device = buffer[:total].to(self.device, non_blocking=True)
        self._copied[turn] = torch.cuda.Event(blocking=True)
        self._copied[turn].record()
        return [device[o : o + int(np.prod(shape))].view(shape) for o, shape in places]
