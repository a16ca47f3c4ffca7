"""CUDA graphs of the prefill forward, one set per token-count bucket.

Launched eagerly, a prefill forward of a mid-sized model is bound by the host: each layer is
nine launches from Python (five of them Triton's), about 0.25 ms of host per layer, longer
than the device takes for a chunk of a few hundred tokens. Every other thread of the process
that takes the GIL meanwhile (the transfer loop gathering and sending the previous chunk)
lengthens the forward by as much. Captured, a forward is a handful of graph launches: the host
queues it in tens of microseconds and runs ahead of the device, so the transfer thread's turns
cost the forward nothing.

A bucket's graphs read their inputs from static buffers: a batch of up to `MAX_SEQS` sequences
and `T` new tokens in all runs in the smallest bucket of at least `T` tokens. Its extra tokens
write their KV to a scratch page no sequence owns; its extra sequences have no tokens and an
empty context, so the attention kernel's programs for them return at once. The attention
kernels take every context length from the device, so one graph serves any mix of chunk
positions. Batches with more sequences or tokens, or wider page tables, run eagerly.

Each bucket is captured as one graph per layer group (`bounds`): between two groups' replays
the engine records the event a layer-wise transfer waits on, as the eager forward does after
those layers.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvferry.daemon.engine.inputs import HostInputs, Uploader, new_slots
from kvferry.daemon.model.batch import Batch
from kvferry.daemon.model.llama import Model

log = logging.getLogger(__name__)

MAX_SEQS = 16  # sequences per captured forward
SMALLEST = 64  # tokens of the smallest bucket; the others double up to the largest forward


def layer_bounds(num_layers: int, layer_group: int) -> tuple[int, ...]:
    """Where a forward's graphs split: after every `layer_group` layers (0: one graph)."""
    if layer_group <= 0 or layer_group >= num_layers:
        return (0, num_layers)
    return (*range(0, num_layers, layer_group), num_layers)


class PrefillGraphs:
    def __init__(
        self, model: Model, kv: torch.Tensor, page_size: int, scratch_page: int, max_tokens: int,
        max_pages: int, bounds: Sequence[int],
    ) -> None:  # fmt: skip
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.model, self.kv, self.page_size = model, kv, page_size
        self.scratch_slot = scratch_page * page_size
        self.bounds = tuple(bounds)
        self.buckets = [b for b in _doubling(SMALLEST, max_tokens) if b < max_tokens]
        self.buckets.append(max_tokens)
        device = kv.device
        # one int32 vector per bucket's inputs, laid out by `_views` from its start
        self.vector = torch.zeros(self._length(self.buckets[-1]), dtype=torch.int32, device=device)
        self.table = torch.full((MAX_SEQS, max_pages), scratch_page, dtype=torch.int32,
                                device=device)  # fmt: skip
        self._graphs: dict[int, tuple[list[torch.cuda.CUDAGraph], torch.Tensor]] = {}
        self.replays = 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def fits(self, inputs: HostInputs) -> bool:
        """Whether this batch can run in a captured forward."""
        return (
            len(inputs.tokens) <= self.max_tokens
            and len(inputs.counts) <= MAX_SEQS
            and inputs.table.shape[1] <= self.table.shape[1]
            and inputs.pending.shape[1] == 0
        )

    def capture(self) -> None:
        """Capture every bucket, largest first (the others reuse its memory pool)."""
        began, pool = time.perf_counter(), None
        with torch.inference_mode():
            for size in reversed(self.buckets):
                vector = self._empty_inputs(size)
                self.vector[: vector.size].copy_(torch.from_numpy(vector))
                batch = self._batch(size)
                self.model.run(batch, self.kv)  # warm-up: kernels compiled, cuBLAS sized
                torch.cuda.synchronize(self.kv.device)
                graphs, state, logits = [], None, None
                for start, end in itertools.pairwise(self.bounds):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        if state is None:
                            state = self.model.embed(batch)
                        self.model.layers(state, self.kv, start, end)
                        if end == self.bounds[-1]:
                            logits = self.model.head(state)
                    pool = graph.pool()
                    graphs.append(graph)
                self._graphs[size] = (graphs, logits)
        log.info(
            "captured CUDA graphs of the prefill forward (%d to %d tokens, %d graphs each) in "
            "%.1f s", self.buckets[0], self.max_tokens, len(self.bounds) - 1,
            time.perf_counter() - began,
        )  # fmt: skip

    def run(
        self, inputs: HostInputs, uploader: Uploader,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Logits [S, vocab] at each sequence's last new token, for a batch that `fits`; the
        graph's output buffer: read them before the next forward. `after_layer(n)` is called
        once layers [0, n) are queued, at each bound."""
        size, vector = self.pack(inputs)
        device_vector, device_table = uploader.upload(vector, inputs.table)
        self.vector[: vector.size].copy_(device_vector)
        seqs, width = inputs.table.shape
        self.table[:seqs, :width].copy_(device_table)
        graphs, logits = self._graphs[size]
        for graph, end in zip(graphs, self.bounds[1:], strict=True):
            graph.replay()
            if after_layer is not None:
                after_layer(end)
        self.replays += 1
        return logits[:seqs]

    def pack(self, inputs: HostInputs) -> tuple[int, np.ndarray]:
        """The bucket a batch runs in, and its input vector (`_views`)."""
        tokens, seqs = len(inputs.tokens), len(inputs.counts)
        size = next(b for b in self.buckets if b >= tokens)
        vector = self._empty_inputs(size)
        v = _views(vector, size)
        v["tokens"][:tokens] = inputs.tokens
        v["positions"][:tokens] = inputs.positions
        v["slots"][:tokens] = new_slots(inputs, self.page_size)
        ends = np.cumsum(inputs.counts)
        v["lengths"][:seqs] = inputs.lengths
        v["starts"][1 : seqs + 1] = ends
        v["starts"][seqs + 1 :] = tokens
        v["last"][:seqs] = ends - 1
        return size, vector

    def _empty_inputs(self, size: int) -> np.ndarray:
        """A bucket's input vector with no sequence in it: every token to the scratch slot."""
        vector = np.zeros(self._length(size), dtype=np.int32)
        _views(vector, size)["slots"][:] = self.scratch_slot
        return vector

    def _batch(self, size: int) -> Batch:
        """The Batch a bucket's graphs read: views of the static buffers."""
        v = _views(self.vector, size)
        return Batch(
            v["tokens"], v["positions"], v["slots"], v["last"], self.table, v["lengths"],
            v["starts"], page_size=self.page_size, max_new=size,
        )  # fmt: skip

    @staticmethod
    def _length(size: int) -> int:
        return 3 * size + 3 * MAX_SEQS + 1


def _views(vector, size: int) -> dict:
    """A bucket's inputs in one vector: tokens, positions, slots [size]; lengths, last
    [MAX_SEQS]; starts [MAX_SEQS + 1]."""
    parts = {"tokens": size, "positions": size, "slots": size, "lengths": MAX_SEQS,
             "starts": MAX_SEQS + 1, "last": MAX_SEQS}  # fmt: skip
    views, offset = {}, 0
    for name, n in parts.items():
        views[name] = vector[offset : offset + n]
        offset += n
    return views


def _doubling(first: int, limit: int):
    size = first
    while size < limit:
        yield size
        size *= 2
