"""CUDA graphs of the prefill forward, one set per bucket of sequences and tokens.

Launched eagerly, a prefill forward of a mid-sized model is bound by the host: each layer is
nine launches from Python (five of them Triton's), about 0.25 ms of host per layer, longer
than the device takes for a chunk of a few hundred tokens. Every other thread of the process
that takes the GIL meanwhile (the transfer loop gathering and sending the previous chunk)
lengthens the forward by as much. Captured, a forward is a handful of graph launches: the host
queues it in tens of microseconds and runs ahead of the device, so the transfer thread's turns
cost the forward nothing.

A bucket's graphs read their inputs from static buffers: a batch of `S` sequences and `T` new
tokens in all runs in the smallest bucket of at least `S` sequences (1, 4 or `MAX_SEQS`) and
`T` tokens (`token_buckets`: fine steps, so that from 512 tokens on a batch is padded by at
most half its tokens, and from 1,024 on by at most a quarter). Its extra tokens write their KV
to a scratch page no sequence owns; its extra sequences have no tokens and an empty context,
so the attention kernel's programs for them return at once. The attention kernels take every
context length from the device, so one graph serves any mix of chunk positions. Batches with
more sequences or tokens than the largest bucket, or wider page tables, run eagerly: past
`MAX_TOKENS` a forward keeps the device busier than its launch keeps the host, and padding
would cost more than it saves.

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
from kvferry.staging.layout import layer_groups

log = logging.getLogger(__name__)

SEQ_BUCKETS = (1, 4, 16)
MAX_SEQS = SEQ_BUCKETS[-1]  # sequences per captured forward
MAX_TOKENS = 4096  # tokens per captured forward


def token_buckets(limit: int) -> list[int]:
    """Token counts captured for forwards of up to `limit` tokens (at most MAX_TOKENS):
    doubling to 512, then steps of 256 to 2048 and of 512 above, and `limit` itself."""
    top = min(limit, MAX_TOKENS)
    sizes = [64, 128, 256, *range(512, 2048, 256), *range(2048, MAX_TOKENS, 512)]
    return [size for size in sizes if size < top] + [top]


def layer_bounds(num_layers: int, layer_group: int, taper: bool = False) -> tuple[int, ...]:
    """Where a forward's graphs split: after each transfer layer group (`layout.layer_groups`;
    layer_group 0: one graph)."""
    return (0, *(group.stop for group in layer_groups(num_layers, layer_group, taper)))


class PrefillGraphs:
    """The prefill forward of `model` over the cache `kv`, captured per bucket (`capture`) and
    replayed for each batch that `fits` (`run`); a batch's spare tokens write to
    `scratch_page`, its page table is at most `max_pages` wide."""

    def __init__(
        self, model: Model, kv: torch.Tensor, page_size: int, scratch_page: int, max_tokens: int,
        max_pages: int, bounds: Sequence[int],
    ) -> None:  # fmt: skip
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.model, self.kv, self.page_size = model, kv, page_size
        self.scratch_slot = scratch_page * page_size
        self.bounds = tuple(bounds)
        self.buckets = token_buckets(max_tokens)
        device = kv.device
        # every bucket's inputs in one int32 vector, laid out by `_views` from its start
        self.vector = torch.zeros(_length(MAX_SEQS, self.max_tokens), dtype=torch.int32,
                                  device=device)  # fmt: skip
        self.table = torch.full((MAX_SEQS, max_pages), scratch_page, dtype=torch.int32,
                                device=device)  # fmt: skip
        Graphs = tuple[list[torch.cuda.CUDAGraph], torch.Tensor]
        self._graphs: dict[tuple[int, int], Graphs] = {}  # (sequences, tokens): graphs, logits
        self.replays = 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket(self, seqs: int, tokens: int) -> tuple[int, int]:
        """The (sequences, tokens) bucket a batch of that many runs in."""
        seq_bucket = next(s for s in SEQ_BUCKETS if s >= seqs)
        return seq_bucket, next(b for b in self.buckets if b >= tokens)

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
            for key in sorted(itertools.product(SEQ_BUCKETS, self.buckets), reverse=True):
                vector = self._empty_inputs(*key)
                self.vector[: vector.size].copy_(torch.from_numpy(vector))
                batch = self._batch(*key)
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
                self._graphs[key] = (graphs, logits)
        log.info(
            "captured CUDA graphs of the prefill forward (%d to %d sequences, %d to %d tokens; "
            "%d graphs) in %.1f s", SEQ_BUCKETS[0], MAX_SEQS, self.buckets[0], self.max_tokens,
            sum(len(g) for g, _ in self._graphs.values()), time.perf_counter() - began,
        )  # fmt: skip

    def run(
        self, inputs: HostInputs, uploader: Uploader,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Logits [S, vocab] at each sequence's last new token, for a batch that `fits`; the
        graph's output buffer: read them before the next forward. `after_layer(n)` is called
        once layers [0, n) are queued, at each bound."""
        key, vector = self.pack(inputs)
        device_vector, device_table = uploader.upload(vector, inputs.table)
        self.vector[: vector.size].copy_(device_vector)
        seqs, width = inputs.table.shape
        self.table[:seqs, :width].copy_(device_table)
        graphs, logits = self._graphs[key]
        for graph, end in zip(graphs, self.bounds[1:], strict=True):
            graph.replay()
            if after_layer is not None:
                after_layer(end)
        self.replays += 1
        return logits[:seqs]

    def pack(self, inputs: HostInputs) -> tuple[tuple[int, int], np.ndarray]:
        """The bucket a batch runs in, and its input vector (`_views`)."""
        tokens, seqs = len(inputs.tokens), len(inputs.counts)
        key = self.bucket(seqs, tokens)
        vector = self._empty_inputs(*key)
        v = _views(vector, *key)
        v["tokens"][:tokens] = inputs.tokens
        v["positions"][:tokens] = inputs.positions
        v["slots"][:tokens] = new_slots(inputs, self.page_size)
        ends = np.cumsum(inputs.counts)
        v["lengths"][:seqs] = inputs.lengths
        v["starts"][1 : seqs + 1] = ends
        v["starts"][seqs + 1 :] = tokens
        v["last"][:seqs] = ends - 1
        return key, vector

    def _empty_inputs(self, seqs: int, size: int) -> np.ndarray:
        """A bucket's input vector with no sequence in it: every token to the scratch slot."""
        vector = np.zeros(_length(seqs, size), dtype=np.int32)
        _views(vector, seqs, size)["slots"][:] = self.scratch_slot
        return vector

    def _batch(self, seqs: int, size: int) -> Batch:
        """The Batch a bucket's graphs read: views of the static buffers."""
        v = _views(self.vector, seqs, size)
        return Batch(
            v["tokens"], v["positions"], v["slots"], v["last"], self.table[:seqs], v["lengths"],
            v["starts"], page_size=self.page_size, max_new=size,
        )  # fmt: skip


def _length(seqs: int, size: int) -> int:
    return 3 * size + 3 * seqs + 1


def _views(vector, seqs: int, size: int) -> dict:
    """A bucket's inputs in one vector: tokens, positions, slots [size]; lengths, last [seqs];
    starts [seqs + 1]."""
    parts = {"tokens": size, "positions": size, "slots": size, "lengths": seqs,
             "starts": seqs + 1, "last": seqs}  # fmt: skip
    views, offset = {}, 0
    for name, n in parts.items():
        views[name] = vector[offset : offset + n]
        offset += n
    return views
