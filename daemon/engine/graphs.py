"""CUDA graphs of the decode forward, one per batch-size bucket.

A decode step of a small model is hundreds of kernel launches of a few microseconds each; the
host cannot issue them as fast as the GPU runs them. Captured once at start-up, a step is one
graph launch. Each bucket's graph reads its inputs from static buffers (token, position and
page-table rows); a batch runs in the smallest bucket that holds it, its extra rows pointed at
a scratch page no sequence owns, so their KV writes land nowhere that matters. Larger batches
run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from kvferry.daemon.model.batch import Batch
from kvferry.daemon.model.llama import Model

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(
        self, model: Model, kv: torch.Tensor, page_size: int, scratch_page: int, max_batch: int,
        max_pages: int,
    ) -> None:  # fmt: skip
        self.model, self.kv, self.page_size, self.scratch = model, kv, page_size, scratch_page
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        device = kv.device
        top = self.buckets[-1]
        self.tokens = torch.zeros(top, dtype=torch.int32, device=device)
        self.positions = torch.zeros(top, dtype=torch.int32, device=device)
        self.table = torch.full((top, max_pages), scratch_page, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self) -> None:
        """Capture every bucket, largest first (the others reuse its memory pool)."""
        began, pool = time.perf_counter(), None
        for size in reversed(self.buckets):
            self._step(size)  # warm-up: compiles the kernels, sizes the cuBLAS workspaces
            torch.cuda.synchronize(self.kv.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._step(size)
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        log.info(
            "captured %d CUDA graphs of the decode step (batch %d..%d) in %.1f s",
            len(self.buckets), self.buckets[0], self.max_batch, time.perf_counter() - began,
        )  # fmt: skip

    def run(self, tokens, positions, table, pending=None, sampled=None) -> torch.Tensor:
        """Logits [B, vocab] of one decode step over device inputs tokens, positions [B] and
        table [B, W] (int32); `pending` [2, P]: tokens[pending[0]] = sampled[pending[1]]. The
        logits are the graph's output buffer: read them before the next step."""
        n = len(tokens)
        size = next(b for b in self.buckets if b >= n)
        self.tokens[:n].copy_(tokens)
        if pending is not None and pending.shape[1]:
            self.tokens[pending[0].long()] = sampled[pending[1].long()].to(torch.int32)
        self.positions[:n].copy_(positions)
        self.table[:n, : table.shape[1]].copy_(table)
        if n < size:  # rows of an earlier, larger batch: write to the scratch page instead
            self.positions[n:size].zero_()
            self.table[n:size, 0].fill_(self.scratch)
        graph, logits = self._graphs[size]
        graph.replay()
        self.replays += 1
        return logits[:n]

    def _step(self, size: int) -> torch.Tensor:
        batch = Batch.decode_step(
            self.tokens[:size], self.positions[:size], self.table[:size], self.page_size
        )
        return self.model.run(batch, self.kv)
