"""Where gathers and scatters run: a CUDA side stream ordered by events, or inline on a CPU.

Every copy returns a Fence the transfer thread polls; nothing here waits on the host.
"""

from __future__ import annotations

import torch

from kvferry.staging.kv_copy import KVPlanes, gather, scatter


class Fence:
    """Completion of queued device work; `done()` never blocks."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event

    def done(self) -> bool:
        return self._event is None or self._event.query()

    @property
    def event(self) -> torch.cuda.Event | None:
        return self._event


DONE = Fence()


class CopyStream:
    """Gathers and scatters for one rank's cache, off the compute stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def gather(
        self,
        planes: KVPlanes,
        slots,
        head_start: int,
        num_heads: int,
        out: torch.Tensor,
        after: Fence | None = None,
    ) -> Fence:
        """Queue a gather once `after` (e.g. the forward that wrote the KV) has completed."""
        return self._run(gather, (planes, slots, head_start, num_heads, out), after)

    def scatter(
        self,
        src: torch.Tensor,
        planes: KVPlanes,
        slots,
        head_start: int,
        num_heads: int,
        after: Fence | None = None,
    ) -> Fence:
        return self._run(scatter, (src, planes, slots, head_start, num_heads), after)

    def _run(self, copy, args, after: Fence | None) -> Fence:
        if self._stream is None:
            copy(*args)  # CPU: the copy is done when it returns
            return DONE
        with torch.cuda.stream(self._stream):
            if after is not None and after.event is not None:
                self._stream.wait_event(after.event)
            copy(*args)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Fence(event)
