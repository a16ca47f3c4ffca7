"""Where gathers and scatters run: a CUDA side stream ordered by events, or a copy thread on a
CPU — never the thread that queues them.

Every copy returns a Fence; `done()` never blocks. Whoever waits for fences is told when one
fires: on a GPU a waiter thread sleeps in the CUDA event (blocking sync, the GIL released) of
each copy in stream order; on a CPU the copy thread runs the copies in order (torch releases
the GIL while it copies). Either calls `notify` as each completes, so the transfer thread needs
no polling and spends no time copying.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from kvferry.staging.kv_copy import KVPlanes, gather, host_copy, scatter

log = logging.getLogger(__name__)


class Fence:
    """Completion of queued device work; `done()` never blocks."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def failed(self) -> str | None:
        """Why the work failed, once done (a device copy that was queued cannot)."""
        return None

    @property
    def event(self) -> torch.cuda.Event | None:
        return self._event


class _HostFence(Fence):
    """Completion of a copy queued on the CPU copy thread (no event: one thread orders them)."""

    __slots__ = ("error", "fired")

    def __init__(self) -> None:
        super().__init__()
        self.fired, self.error = False, None

    def done(self) -> bool:
        return self.fired

    def failed(self) -> str | None:
        return self.error


DONE = Fence()


class CopyStream:
    """Gathers and scatters for one rank's cache, off the compute stream and off the caller's
    thread. `notify` is called (from the worker thread) each time a copy's fence fires; without
    it a CPU copy runs inline."""

    def __init__(self, device: torch.device, notify: Callable[[], None] | None = None) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._worker = _Worker(device, notify) if notify is not None else None

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
        if self._stream is None:
            return self._on_host(planes, slots, head_start, num_heads, out, gather=True)
        return self._on_stream(gather, (planes, slots, head_start, num_heads, out), after)

    def scatter(
        self,
        src: torch.Tensor,
        planes: KVPlanes,
        slots,
        head_start: int,
        num_heads: int,
        after: Fence | None = None,
    ) -> Fence:
        if self._stream is None:
            return self._on_host(planes, slots, head_start, num_heads, src, gather=False)
        return self._on_stream(scatter, (src, planes, slots, head_start, num_heads), after)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()

    def _on_stream(self, copy, args, after: Fence | None) -> Fence:
        with torch.cuda.stream(self._stream):
            if after is not None and after.event is not None:
                self._stream.wait_event(after.event)
            copy(*args)
            event = torch.cuda.Event(blocking=True)  # a host wait on it sleeps, never spins
            event.record(self._stream)
        if self._worker is not None:
            self._worker.submit(event.synchronize)  # releases the GIL; sleeps in the driver
        return Fence(event)

    def _on_host(self, planes, slots, head_start, num_heads, staging, gather: bool) -> Fence:
        """A CPU copy: checked here (a bad slot raises to the caller), run on the worker (a CPU
        forward is done when it returns, so there is nothing to wait for first)."""
        copy = host_copy(planes, slots, head_start, num_heads, staging, gather)
        if self._worker is None:
            copy()
            return DONE
        fence = _HostFence()

        def job() -> None:
            try:
                copy()
            except Exception as exc:  # the room fails, never the thread
                log.exception("copy failed")
                fence.error = f"copy failed: {type(exc).__name__}: {exc}"
            fence.fired = True

        self._worker.submit(job)
        return fence


class _Worker:
    """One thread that runs jobs in the order they were queued and calls `notify` after each:
    on a GPU each job waits for one copy's event (one stream: they fire in that order), on a
    CPU each job is the copy itself."""

    def __init__(self, device: torch.device, notify: Callable[[], None]) -> None:
        self._device, self._notify = device, notify
        self._jobs: deque[Callable[[], None]] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvferry-copies")
                self._thread.daemon = True
                self._thread.start()
            self._jobs.append(job)
            self._ready.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                job = self._jobs[0]
            job()
            with self._ready:
                self._jobs.popleft()
            self._notify()
