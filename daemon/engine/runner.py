"""Runs the model over a scheduled batch on one rank: builds the inputs from the sequences,
calls the forward, samples. Owns the rank's paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.graphs import DecodeGraphs
from kvferry.daemon.engine.inputs import Uploader, host_inputs, new_slots
from kvferry.daemon.engine.prefill_graphs import PrefillGraphs, layer_bounds
from kvferry.daemon.engine.sampler import Sampled, Sampler
from kvferry.daemon.engine.scheduler import Work
from kvferry.daemon.model.batch import Batch
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.ops import KernelOps
from kvferry.staging.kv_copy import KVPlanes

DRAW_FAILED = "sampling failed: logits are not finite"  # why a draw on the device failed


class ModelRunner:
    def __init__(
        self,
        model: Model,
        blocks: BlockManager,
        kv_dtype: torch.dtype | None = None,
        graph_batch: int = 0,  # capture decode graphs up to this batch size (0: none)
        graph_tokens: int = 0,  # capture prefill graphs up to this many tokens (0: none)
        layer_group: int = 0,  # prefill graphs: split after each transfer layer group (0: none)
        layer_taper: bool = False,  # ... the last group split in halves (layout.layer_groups)
    ) -> None:
        c = model.config
        self.model, self.blocks = model, blocks
        graphs = (graph_batch > 0 or graph_tokens > 0) and graphs_usable(model)
        pages = blocks.num_pages + graphs  # the last page: scratch for a graph's spare rows
        shape = (2 * c.num_hidden_layers, pages * blocks.page_size, model.local_kv, c.head_dim)
        self.kv = torch.zeros(shape, dtype=kv_dtype or model.dtype, device=model.device)
        self.planes = KVPlanes.from_cache(self.kv)
        self.sampler = Sampler()
        self.uploader = Uploader(model.device)
        self.graphs = None
        if graphs and graph_batch > 0:
            self.graphs = DecodeGraphs(
                model, self.kv, blocks.page_size, blocks.num_pages, graph_batch, blocks.num_pages
            )
            _capture(self.graphs.capture, "decode step")
        self.prefill_graphs = None
        if graphs and graph_tokens > 0:
            bounds = layer_bounds(c.num_hidden_layers, layer_group, layer_taper)
            self.prefill_graphs = PrefillGraphs(
                model, self.kv, blocks.page_size, blocks.num_pages, graph_tokens,
                blocks.num_pages, bounds,
            )  # fmt: skip
            _capture(self.prefill_graphs.capture, "prefill forward")

    def forward(
        self,
        batch: list[Work],
        future: Future | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [len(batch), vocab] at the last token of each work item. A decode input whose
        token the host has not seen yet is taken from `future`, on the device. `after_layer`:
        see Model.run."""
        inputs = host_inputs(batch, self.blocks, future.rows if future is not None else {})
        sampled = future.tokens if future is not None else None
        if self.graphs is not None and inputs.decode and len(batch) <= self.graphs.max_batch:
            tokens, positions, table, pending = self.uploader.upload(
                inputs.tokens, inputs.positions, inputs.table, inputs.pending
            )
            return self.graphs.run(tokens, positions, table, pending, sampled)
        captured = self.prefill_graphs
        if captured is not None and not inputs.decode and captured.fits(inputs):
            return captured.run(inputs, self.uploader, after_layer)
        ends = np.cumsum(inputs.counts)
        tokens, positions, slots, table, lengths, starts, pending = self.uploader.upload(
            inputs.tokens,
            inputs.positions,
            new_slots(inputs, self.blocks.page_size),
            inputs.table,
            inputs.lengths,
            np.concatenate([[0], ends]),
            inputs.pending,
        )
        if pending.shape[1]:
            tokens[pending[0].long()] = sampled[pending[1].long()].to(tokens.dtype)
        forward = Batch(
            tokens, positions, slots, starts[1:].long() - 1, table, lengths, starts,
            page_size=self.blocks.page_size, max_new=int(inputs.counts.max()),
        )  # fmt: skip
        return self.model.run(forward, self.kv, after_layer)

    @property
    def graph_forwards(self) -> int:
        """Forwards run as replays of captured graphs so far."""
        return sum(g.replays for g in (self.graphs, self.prefill_graphs) if g is not None)

    def sample(self, logits: torch.Tensor, seqs) -> Sampled:
        return self.sampler.sample(logits, seqs)

    def sample_prompt_ends(self, batch: list[Work], logits: torch.Tensor) -> Future | None:
        """`sample_async` for the work items that complete their prompt (their first token);
        None when no item does. Nothing here waits for the device: the prefill engine hands
        the forward's KV to the transfer thread once this returns, which should be while the
        device still runs the forward (an index from a Python list would be copied to the
        device from pageable memory, which makes the host wait for the stream first). On a
        GPU the draws are made there, and a failed one is known once the tokens are
        (`Future.failed`); on a CPU at once (`Future.errors`)."""
        rows = [i for i, work in enumerate(batch) if work.completes_prompt]
        if not rows:
            return None
        if len(rows) < len(batch):
            logits = logits.index_select(0, self.model.upload(np.array(rows, np.int64)))
        return self.sample_async(logits, [batch[i] for i in rows], upload=self._upload_now)

    def _upload_now(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Int32 arrays to the device through pinned blocks of their own: unlike the
        Uploader's two buffers taken in turn, never waits for an earlier step's copy."""
        return [self.model.upload(np.ascontiguousarray(a, np.int32)) for a in arrays]

    def sample_async(self, logits: torch.Tensor, batch: list[Work], upload=None) -> Future:
        """Sample without waiting for the device: the tokens stay on it (for the next step's
        inputs) and are copied to pinned host memory, ready once `event` fires. On a GPU the
        draws are made there too, and failed draws are known once the tokens are; on a CPU
        sampled rows draw on the host at once. `upload`: how the draws' knobs go to the
        device (default: the Uploader)."""
        seqs, errors, failed = [work.seq for work in batch], {}, None
        if logits.device.type == "cuda":
            upload = upload or self.uploader.upload
            tokens, failed = self.sampler.sample_on_device(logits, seqs, upload)
        elif any(seq.params.temperature > 0 for seq in seqs):  # sampling draws on the host
            sampled = self.sampler.sample(logits, seqs)
            tokens, errors = self.model.upload(torch.tensor(sampled.tokens)), sampled.errors
        else:
            tokens = logits.argmax(dim=-1)
        rows = {seq.id: row for row, seq in enumerate(seqs)}
        if tokens.device.type != "cuda":
            return Future(batch, tokens, rows, tokens, None, errors)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        host_failed = None
        if failed is not None:
            host_failed = torch.empty(failed.shape, dtype=torch.bool, pin_memory=True)
            host_failed.copy_(failed, non_blocking=True)
        event = torch.cuda.Event(blocking=True)  # waiting on it sleeps in the driver
        event.record()
        return Future(batch, tokens, rows, host, event, errors, host_failed)


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
    failed: torch.Tensor | None = None  # [B] host bool, draws made on the device: read in result

    def result(self) -> list[int]:
        """The host tokens, once their copy is done (the device meanwhile runs the step queued
        after this one); `errors` is complete from here on. The wait sleeps in a blocking-sync
        event with the GIL released: no spinning, and the transfer thread runs meanwhile."""
        if self.event is not None:
            self.event.synchronize()
        if self.failed is not None:
            for work, failed in zip(self.batch, self.failed.tolist(), strict=True):
                if failed:
                    self.errors[work.seq.id] = DRAW_FAILED
        return self.host.tolist()


def _capture(capture: Callable[[], None], what: str) -> None:
    """Run a graph capture; a device out of memory for it is an error that says what to change."""
    try:
        capture()
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(
            f"capturing the CUDA graphs of the {what} ran out of device memory: lower "
            "cache.num_pages, scheduler.max_running or scheduler.max_batch_tokens, or set "
            f"engine.cuda_graphs: false ({exc})"
        ) from exc


def graphs_usable(model: Model) -> bool:
    """Whether the forward can be captured: on a GPU, through the kernels (the eager attention
    reads context lengths back), and with a TP all-reduce a graph can hold (NCCL's, or that of
    ranks sharing a GPU where they meet on the device; not where they meet on the host)."""
    if model.device.type != "cuda" or not isinstance(model.ops, KernelOps):
        return False
    return model.reduce_capturable
