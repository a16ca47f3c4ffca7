"""Where gathers and scatters run: a CUDA side stream ordered by events, or inline on a CPU.

Every copy returns a Fence; `done()` never blocks. On a GPU each copy's event is followed on
the stream by a host function that makes `wake_fd` readable: whoever sleeps on that descriptor
(the transfer loop) is woken by the driver itself once the copy is done, with no thread of ours
in between, and calls `collect()`, which marks the fences that fired and takes their events
back for reuse (creating a CUDA event costs more host time than recording one, and a copy is on
every data message's path).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections import deque

import numpy as np
import torch

from kvferry.staging import cuda_driver as driver  # loads the driver on first use only
from kvferry.staging import fd_read
from kvferry.staging.host_copy import write_host_copy
from kvferry.staging.kv_copy import KVPlanes, gather, scatter


class Fence:
    """Completion of queued device work; `done()` never blocks. Wraps a driver Event (a copy's)
    or a torch.cuda.Event (a forward's), queried through the driver with the GIL held."""

    __slots__ = ("_event", "_handle")

    def __init__(self, event=None) -> None:
        self._event = event  # kept alive while the fence may be queried or waited on
        self._handle = 0 if event is None else driver.handle_of(event)

    def done(self) -> bool:
        return not self._handle or driver.query_event(self._handle)

    @property
    def event(self):
        """The event to order later work after; None once fired (nothing to wait for)."""
        return self._event

    @property
    def handle(self) -> int:
        """The raw CUevent to wait on; 0 once fired or if there is nothing to wait for."""
        return self._handle

    def order(self, stream: int, device: int) -> None:
        """Make work queued later on `stream` (a raw cudaStream_t of device `device`) wait for
        this fence's work; nothing to do once it fired. Safe from another thread than the
        copies' own: should the event fire and be recorded again for a later copy meanwhile,
        the wait covers that copy too, which the copy stream runs after this one."""
        handle = self._handle
        if handle:
            driver.use_device(device)
            driver.wait_event(stream, handle)

    def synchronize(self) -> None:
        """Block until this fence's work is done (the GIL let go meanwhile)."""
        handle = self._handle
        if handle:
            driver.synchronize_event(handle)

    def fired(self):
        """Mark the fence fired (its work is known complete); its event, now free for reuse."""
        event, self._event, self._handle = self._event, None, 0
        return event


DONE = Fence()


class _HostCopy:
    """What `chain_scatter` answers for a cache in host memory: the receive's completion runs
    the copy itself, so there is nothing to wait for afterwards."""


HOST_COPY = _HostCopy()


class CopyStream:
    """Gathers and scatters for one rank's cache, off the compute stream. Used from one thread
    (the transfer loop)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._index = self._stream.device.index if self._stream is not None else None
        # the raw handle: copies are launched on it directly, without making it torch's current
        # stream (entering and leaving that context costs more host time than the launch)
        self._handle = self._stream.cuda_stream if self._stream is not None else None
        self._signal = HostSignal() if self._stream is not None else None
        self._pending: deque[Fence] = deque()  # not yet seen fired, in stream order
        self._spare: list = []  # driver events of fired fences, to record again

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
        wake: bool = True,
    ) -> Fence:
        """Queue a gather once `after` (e.g. the forward that wrote the KV) has completed.
        `wake=False`: as for `scatter`."""
        return self._run(gather, (planes, slots, head_start, num_heads, out), after, wake)

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

    def upload_slots(self, slots: np.ndarray) -> torch.Tensor:
        """`slots` as int32 on the device, uploaded on this stream: what `chain_scatter`s read
        (on a CPU: `slots` themselves as contiguous int64, which their owner keeps). The
        tensor belongs to this stream: it may be dropped once no copy queued later needs it
        (its memory is reused only by work queued on this stream after that)."""
        if self._stream is None:
            return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))
        from kvferry.staging.kv_launch import uploader_of  # deferred: needs cupy

        with torch.cuda.stream(self._stream):
            device = torch.empty(len(slots), dtype=torch.int32, device=self.device)
        uploader = uploader_of(self.device)
        driver.use_device(self._index)
        with uploader.lock:
            uploader.upload_to(device.data_ptr(), slots, self._handle)
        return device

    def chain_scatter(
        self,
        launch,
        src,
        planes: KVPlanes,
        device_slots: int,
        num_tokens: int,
        head_start: int,
        num_heads: int,
    ) -> driver.Event | _HostCopy:
        """Write into `launch` (a native receive's record, transport/native.py) the scatter of
        `src` into heads [head_start, +num_heads) of `num_tokens` slots (at `device_slots`, from
        `upload_slots`): the receive's completion launches it on this stream and records the
        returned event (on a CPU it copies: HOST_COPY). Then `chained_done` once the
        receive completed. Everything given has been checked by the caller."""
        launch.expected = src.nbytes
        if self._stream is None:
            launch.host, launch.grid_y = 1, planes.num_planes
            write_host_copy(
                launch.args, planes, device_slots, num_tokens, head_start, num_heads,
                src.data_ptr(),
            )  # fmt: skip
            return HOST_COPY
        from kvferry.staging.kv_launch import BLOCK, write_kv_copy  # deferred: needs cupy

        event = self._spare.pop() if self._spare else driver.Event()
        launch.block = BLOCK
        launch.function, grid = write_kv_copy(
            launch.args, planes, device_slots, num_tokens, head_start, num_heads,
            src.data_ptr(), gather=False,
        )  # fmt: skip
        launch.grid_x, launch.grid_y = grid
        launch.stream, launch.event = self._handle, event.handle
        return event

    def chained_done(
        self, event: driver.Event | _HostCopy, launched: bool, last: bool, wake: bool = True
    ) -> Fence | None:
        """The receive of a chained scatter (its event) completed; `launched`: whether its
        scatter was queued (a host copy: has run). Its fence, None if it never ran. `last`:
        the room's last message: native code queues scatters in the order receives complete,
        which need not be the order their owner sees them, so the fence returned is then
        recorded now, after every copy queued so far, and `wake_fd` fires when it is done
        unless `wake` is False."""
        if event is HOST_COPY:  # done inside the receive's completion, if at all
            return DONE if launched else None
        if not launched:
            self._spare.append(event)
            return None
        fence = Fence(event)
        self._pending.append(fence)
        if not last:
            return fence
        driver.use_device(self._index)
        return self._fence(wake=wake)

    def after(self, fence: Fence) -> Fence:
        """A fence that fires once `fence` (work of another stream, e.g. a forward's) has, and
        makes `wake_fd` readable then: for work someone waits for that no copy of its own
        follows. DONE where there is nothing to wait for (a CPU, a fence that fired)."""
        if self._stream is None or not fence.handle:
            return DONE
        driver.use_device(self._index)
        driver.wait_event(self._handle, fence.handle)
        return self._fence(wake=True)

    def wake_when_done(self) -> None:
        """Make `wake_fd` readable once every copy queued so far has finished (for copies
        queued with `wake=False` that someone now waits for)."""
        if self._pending:
            driver.use_device(self._index)
            self._signal.queue(self._handle)

    def collect(self) -> None:
        """After `wake_fd` turned readable: mark the fences whose copies finished fired (their
        events go back to the pool)."""
        if self._signal is None:
            return
        self._signal.clear()
        self.take_fired()

    def take_fired(self) -> None:
        """Mark the fences whose copies finished fired, their events back to the pool: for
        copies that no wake follows (the owner looked at their fences in a turn of its own)."""
        while self._pending and self._pending[0].done():
            self._spare.append(self._pending.popleft().fired())

    def close(self) -> None:
        """Release the descriptor, unless copies are still queued: a host function of theirs
        will write to it, so it stays open (never reused for another file) rather than make
        closing wait for a device that may not finish."""
        if self._signal is not None and self._stream.query():
            self._signal.close()
        self._signal = None
        for event in self._spare:
            event.destroy()
        self._spare = []

    def _run(self, copy, args, after: Fence | None, wake: bool = True) -> Fence:
        if self._stream is None:
            copy(*args)  # CPU: the copy is done when it returns
            return DONE
        driver.use_device(self._index)
        if after is not None and after.handle:
            driver.wait_event(self._handle, after.handle)
        copy(*args, stream=self._handle)
        return self._fence(wake)

    def _fence(self, wake: bool) -> Fence:
        """A fence after everything queued so far (`wake`: `wake_fd` fires once it is done)."""
        event = self._spare.pop() if self._spare else driver.Event()
        event.record(self._handle)
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
        self._function = _eventfd_signal()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def queue(self, stream: int) -> None:
        driver.launch_host_function(stream, self._function, self.fd)

    def clear(self) -> None:
        fd_read.drain(self.fd)  # with the GIL held; nothing signalled since the last clear is fine

    def close(self) -> None:
        os.close(self.fd)


@functools.cache
def _eventfd_signal() -> int:
    """The address of UCX's eventfd signaller."""
    try:
        import libucx  # the UCX wheel of the data plane
    except ImportError as exc:
        raise RuntimeError(
            "copies on a GPU signal their completion through UCX's libucs: install the UCX "
            "wheels (kvferry's cu12 or cu13 extra)"
        ) from exc
    libucx.load_library()
    ucs = ctypes.CDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucs.so"))
    return ctypes.cast(ucs.ucs_async_eventfd_signal, ctypes.c_void_p).value
