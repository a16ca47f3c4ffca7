"""Where gathers and scatters run: a CUDA side stream ordered by events, or inline on a CPU.

Every copy returns a Fence; `done()` never blocks. On a GPU each copy's event is followed on
the stream by a host function that makes `wake_fd` readable: whoever sleeps on that descriptor
(the transfer loop) is woken by the driver itself once the copy is done, with no thread of ours
in between, and calls `collect()`, which marks the fences that fired and takes their events
back for reuse (creating a CUDA event costs more host time than recording one, and a copy is on
every data message's path).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections import deque

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
    """Gathers and scatters for one rank's cache, off the compute stream. Used from one thread
    (the transfer loop)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # the raw handle: copies are launched on it directly, without making it torch's current
        # stream (entering and leaving that context costs more host time than the launch)
        self._handle = self._stream.cuda_stream if self._stream is not None else None
        self._signal = HostSignal() if self._stream is not None else None
        self._pending: deque[Fence] = deque()  # not yet seen fired, in stream order
        self._spare: list[torch.cuda.Event] = []  # events of fired fences, to record again

    @property
    def wake_fd(self) -> int | None:
        """Readable once a copy has finished (then call `collect()`); None on a CPU, where
        copies finish before they return."""
        return None if self._signal is None else self._signal.fd

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
        wake: bool = True,
    ) -> Fence:
        """`wake=False`: `wake_fd` stays silent for this one; a later copy's wake (or
        `wake_when_done`) covers it, as the stream runs them in order."""
        return self._run(scatter, (src, planes, slots, head_start, num_heads), after, wake)

    def wake_when_done(self) -> None:
        """Make `wake_fd` readable once every copy queued so far has finished (for copies
        queued with `wake=False` that someone now waits for)."""
        if self._pending:
            self._signal.queue(self._handle)

    def collect(self) -> None:
        """After `wake_fd` turned readable: mark the fences whose copies finished fired (their
        events go back to the pool)."""
        if self._signal is None:
            return
        self._signal.clear()
        while self._pending and self._pending[0].done():
            self._spare.append(self._pending.popleft().fired())

    def close(self) -> None:
        """Release the descriptor, unless copies are still queued: a host function of theirs
        will write to it, so it stays open (never reused for another file) rather than make
        closing wait for a device that may not finish."""
        if self._signal is not None and self._stream.query():
            self._signal.close()
        self._signal = None

    def _run(self, copy, args, after: Fence | None, wake: bool = True) -> Fence:
        if self._stream is None:
            copy(*args)  # CPU: the copy is done when it returns
            return DONE
        if after is not None and after.event is not None:
            self._stream.wait_event(after.event)
        copy(*args, stream=self._handle)
        event = self._spare.pop() if self._spare else torch.cuda.Event()
        event.record(self._stream)
        if wake:
            self._signal.queue(self._handle)
        fence = Fence(event)
        self._pending.append(fence)
        return fence


class HostSignal:
    """An eventfd that work queued on a CUDA stream makes readable: `queue(stream)` adds a host
    function that writes to it once everything queued before has finished.

    The host function must be native code (the driver runs it on its own thread, and one that
    took the GIL could deadlock against a thread holding the GIL while it waits for the
    device). It is UCX's `ucs_async_eventfd_signal(int fd)` from libucs, which UCX's own CUDA
    transports use the same way and which the data plane's UCX brings: a host function gets one
    pointer-sized argument, and the descriptor travels in it."""

    def __init__(self) -> None:
        self._launch, self._function = _host_function()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def queue(self, stream: int) -> None:
        status = self._launch(stream, self._function, self.fd)
        if status != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed with CUDA error {status}")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):  # nothing signalled since the last clear
            os.eventfd_read(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@functools.cache
def _host_function() -> tuple:
    """(cuLaunchHostFunc, the address of UCX's eventfd signaller)."""
    try:
        import libucx  # the UCX wheel of the data plane
    except ImportError as exc:
        raise RuntimeError(
            "copies on a GPU signal their completion through UCX's libucs: install the UCX "
            "wheels (kvferry's cu12 or cu13 extra)"
        ) from exc
    libucx.load_library()
    ucs = ctypes.CDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucs.so"))
    launch = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
    launch.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    launch.restype = ctypes.c_int
    return launch, ctypes.cast(ucs.ucs_async_eventfd_signal, ctypes.c_void_p)
