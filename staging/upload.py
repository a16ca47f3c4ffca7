"""Host-to-device upload of small per-launch index arrays without allocating per call.

Every gather/scatter needs its token slots on the device. Pinning a fresh host tensor per call
costs tens of microseconds and, while the GPU lags behind, makes the caching host allocator
fall back to cudaHostAlloc. Instead one pinned buffer and one device buffer of the same size are
carved by a RingAllocator; a region is reclaimed when the event recorded after its consumer
kernel has fired. Only when the ring is full of unfinished work does an upload wait (counted).
The copy is queued on the consumer's stream, right before the kernel that reads it.
Driven through cupy's runtime bindings: a launch costs a few microseconds of host time.
"""

from __future__ import annotations

import threading
from collections import deque

import cupy
import numpy as np
import torch

from kvferry.staging.ring import RingAllocator


class IndexUploader:
    """int32 index arrays to one CUDA device through a pinned ring of `capacity` bytes."""

    def __init__(self, device: torch.device, capacity: int = 4 << 20) -> None:
        self.device = device
        self.ring = RingAllocator(capacity, alignment=256)
        with cupy.cuda.Device(device.index):
            self._pinned = cupy.cuda.alloc_pinned_memory(capacity)
            self._device_buf = cupy.cuda.alloc(capacity)
        self._host = np.frombuffer(self._pinned, dtype=np.uint8, count=capacity)
        self._in_flight: deque[tuple[int, cupy.cuda.Event]] = deque()  # oldest first
        self._spare_events: list[cupy.cuda.Event] = []
        self.lock = threading.Lock()  # held by a caller across upload() and done()
        self.waits = 0  # uploads that found the ring full and waited for the GPU

    def upload(self, values: np.ndarray, stream: cupy.cuda.Stream) -> tuple[int, int]:
        """(device address of an int32 copy of `values`, ticket for done()), queued on `stream`."""
        nbytes = values.size * 4
        if nbytes > self.ring.capacity:
            raise ValueError(
                f"{values.size} indices exceed the upload ring of {self.ring.capacity} B"
            )
        self._reclaim()
        offset = self.ring.alloc(max(nbytes, 1))
        while offset is None:  # every region is still in use by queued work: wait for the oldest
            self.waits += 1
            self._in_flight[0][1].synchronize()
            self._reclaim()
            offset = self.ring.alloc(max(nbytes, 1))
        self._host[offset : offset + nbytes].view(np.int32)[:] = values
        target = self._device_buf.ptr + offset
        cupy.cuda.runtime.memcpyAsync(
            target,
            self._pinned.ptr + offset,
            nbytes,
            cupy.cuda.runtime.memcpyHostToDevice,
            stream.ptr,
        )
        return target, offset

    def done(self, ticket: int, stream: cupy.cuda.Stream) -> None:
        """The work reading upload `ticket` is queued on `stream`: reclaim it once that ran."""
        event = (
            self._spare_events.pop() if self._spare_events else cupy.cuda.Event(disable_timing=True)
        )
        event.record(stream)
        self._in_flight.append((ticket, event))

    def _reclaim(self) -> None:
        while self._in_flight and self._in_flight[0][1].done:
            ticket, event = self._in_flight.popleft()
            self.ring.free(ticket)
            self._spare_events.append(event)
