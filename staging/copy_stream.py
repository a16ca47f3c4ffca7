"""Where gathers and scatters run: a CUDA side stream ordered by events, or inline on a CPU.

Every copy returns a Fence; `done()` never blocks. Whoever waits for fences is told when one
fires: a waiter thread sleeps in the CUDA event (blocking sync, the GIL released) of each copy
in stream order and calls `notify` as it completes, so the transfer thread needs no polling.
The waiter then marks the fence fired and puts its event back in a pool: creating a CUDA event
costs more host time than recording one, and a copy is on every data message's path.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch

from kvferry.staging.kv_copy import KVPlanes, gather, scatter


class Fence:
    """Completion of queued device work; `done()` never blocks."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event

    def done(self) -> bool:
        event = self._event
        return event is None or event.query()

    @property
    def event(self) -> torch.cuda.Event | None:
        """The CUDA event to order later work after; None once fired (nothing to wait for)."""
        return self._event

    def fired(self) -> torch.cuda.Event | None:
        """Mark the fence fired (its work is known complete); its event, now free for reuse."""
        event, self._event = self._event, None
        return event


DONE = Fence()


class CopyStream:
    """Gathers and scatters for one rank's cache, off the compute stream. `notify` is called
    (from a waiter thread) each time a copy's fence fires."""

    def __init__(self, device: torch.device, notify: Callable[[], None] | None = None) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # the raw handle: copies are launched on it directly, without making it torch's current
        # stream (entering and leaving that context costs more host time than the launch)
        self._handle = self._stream.cuda_stream if self._stream is not None else None
        # events of fired fences, ready to record again (appended by the waiter thread)
        self._spare: list[torch.cuda.Event] = []
        self._waiter = (
            _Waiter(device, notify, self._spare.append)
            if self._stream is not None and notify
            else None
        )

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

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.stop()

    def _run(self, copy, args, after: Fence | None) -> Fence:
        if self._stream is None:
            copy(*args)  # CPU: the copy is done when it returns
            return DONE
        if after is not None and after.event is not None:
            self._stream.wait_event(after.event)
        copy(*args, stream=self._handle)
        # blocking: a host wait on it sleeps, never spins
        event = self._spare.pop() if self._spare else torch.cuda.Event(blocking=True)
        event.record(self._stream)
        fence = Fence(event)
        if self._waiter is not None:
            self._waiter.watch(fence)
        return fence


class _Waiter:
    """One thread that waits for copy fences in the order they were recorded (one stream: they
    fire in that order), marks each fired, hands its event to `recycle`, then calls `notify`."""

    def __init__(
        self,
        device: torch.device,
        notify: Callable[[], None],
        recycle: Callable[[torch.cuda.Event], None],
    ) -> None:
        self._device, self._notify, self._recycle = device, notify, recycle
        self._fences: deque[Fence] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def watch(self, fence: Fence) -> None:
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvferry-copies")
                self._thread.daemon = True
                self._thread.start()
            self._fences.append(fence)
            self._ready.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        if self._device.index is not None:
            torch.cuda.set_device(self._device)
        while True:
            with self._ready:
                while not self._fences and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                fence = self._fences[0]
            fence.event.synchronize()  # releases the GIL; a blocking event sleeps in the driver
            with self._ready:
                self._fences.popleft()
            self._recycle(fence.fired())
            self._notify()
