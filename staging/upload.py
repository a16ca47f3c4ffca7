"""Host-to-device upload of small per-launch index arrays without allocating per call.

Every gather/scatter needs its token slots on the device. Pinning a fresh host tensor per call
costs tens of microseconds and, while the GPU lags behind, makes the caching host allocator
fall back to cudaHostAlloc. Instead one pinned buffer and one device buffer of the same size are
carved by a RingAllocator; a region is reclaimed when the event recorded after its consumer
kernel has fired. Only when the ring is full of unfinished work does an upload wait (counted).

The copies run on the uploader's own stream, so they overlap whatever the consumer stream still
has queued; the consumer only waits on an event. Driven through cupy's runtime bindings: an
upload costs a few microseconds of host time.
"""

from __future__ import annotations

import threading
from collections import deque

import cupy
import numpy as np
import torch

from kvferry.staging.ring import RingAllocator


class IndexUploader:
    """int32 index arrays to one CUDA device through a pinned ring of `capacity` bytes.

    Use as: with uploader.lock: address, ticket = upload(...); <queue consumer>; done(ticket, ...)
    """

    def __init__(self, device: torch.device, capacity: int = 4 << 20) -> None:
        self.device = device
        self.ring = RingAllocator(capacity, alignment=256)
        with cupy.cuda.Device(device.index):
            self._pinned = cupy.cuda.alloc_pinned_memory(capacity)
            self._device_buf = cupy.cuda.alloc(capacity)
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self._host = np.frombuffer(self._pinned, dtype=np.uint8, count=capacity)
        # (ticket, events to recycle, consumer-done event), oldest first
        self._in_flight: deque[tuple[int, cupy.cuda.Event, cupy.cuda.Event]] = deque()
        self._copied: cupy.cuda.Event | None = None  # of the upload awaiting done()
        self._spare_events: list[cupy.cuda.Event] = []
        self.lock = threading.Lock()
        self.waits = 0  # uploads that found the ring full and waited for the GPU

    def upload(self, values: np.ndarray, stream: cupy.cuda.Stream) -> tuple[int, int]:
        """(device address of an int32 copy of `values`, ticket), ready for work on `stream`."""
        nbytes = values.size * 4
        if nbytes > self.ring.capacity:
            raise ValueError(
                f"{values.size} indices exceed the upload ring of {self.ring.capacity} B"
            )
        offset = self._alloc(max(nbytes, 1))
        self._host[offset : offset + nbytes].view(np.int32)[:] = values
        target = self._device_buf.ptr + offset
        # Both regions are free to overwrite: their previous consumer's event has fired.
        cupy.cuda.runtime.memcpyAsync(
            target,
            self._pinned.ptr + offset,
            nbytes,
            cupy.cuda.runtime.memcpyHostToDevice,
            self._stream.ptr,
        )
        self._copied = self._event()
        self._copied.record(self._stream)
        stream.wait_event(self._copied)
        return target, offset

    def done(self, ticket: int, stream: cupy.cuda.Stream) -> None:
        """The work reading upload `ticket` is queued on `stream`: reclaim it once that ran."""
        consumed = self._event()
        consumed.record(stream)
        self._in_flight.append((ticket, self._copied, consumed))
        self._copied = None

    def _alloc(self, nbytes: int) -> int:
        self._reclaim()
        offset = self.ring.alloc(nbytes)
        while offset is None:  # every region is still in use by queued work: wait for the oldest
            self.waits += 1
            self._in_flight[0][2].synchronize()
            self._reclaim()
            offset = self.ring.alloc(nbytes)
        return offset

    def _event(self) -> cupy.cuda.Event:
        return (
            self._spare_events.pop() if self._spare_events else cupy.cuda.Event(disable_timing=True)
        )

    def _reclaim(self) -> None:
        while self._in_flight and self._in_flight[0][2].done:
            ticket, copied, consumed = self._in_flight.popleft()
            self.ring.free(ticket)
            self._spare_events += (copied, consumed)
