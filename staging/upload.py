"""Host-to-device upload of small per-launch index arrays without allocating per call.

Every gather/scatter needs its token slots on the device. Pinning a fresh host tensor per call
costs tens of microseconds and, while the GPU lags behind, makes the caching host allocator
fall back to cudaHostAlloc. Instead one pinned buffer and one device buffer of the same size are
carved by a RingAllocator; a region is reclaimed when the event recorded after its consumer
kernel has fired. Only when the ring is full of unfinished work does an upload wait (counted).

The copy is queued on the consumer's own stream, just before the consumer: stream order alone
makes the kernel see the indices, so an upload costs one async copy and, once the consumer is
queued, one event (a few microseconds of host time, through cuda_driver.py with the GIL held).
"""

from __future__ import annotations

import threading
from collections import deque

import cupy
import numpy as np
import torch

from kvferry.staging import cuda_driver as driver
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
        self._host = np.frombuffer(self._pinned, dtype=np.int32, count=capacity // 4)
        # (ticket, consumer-done event), oldest first
        self._in_flight: deque[tuple[int, driver.Event]] = deque()
        self._spare_events: list[driver.Event] = []
        self.lock = threading.Lock()
        self.waits = 0  # uploads that found the ring full and waited for the GPU

    def upload(self, values: np.ndarray, stream: int) -> tuple[int, int]:
        """(device address of an int32 copy of `values`, ticket), queued on `stream` (a raw
        cudaStream_t) for work queued after it there. `values` must fit in int32."""
        if values.size * 4 > self.ring.capacity:
            raise ValueError(
                f"{values.size} indices exceed the upload ring of {self.ring.capacity} B"
            )
        return self._copy(values, None, stream)

    def upload_to(self, target: int, values: np.ndarray, stream: int) -> None:
        """Queue an int32 copy of `values` to device memory at `target` (the caller's) on
        `stream`, in pieces of at most half the ring; the pinned regions they pass through are
        reclaimed once the copies have run."""
        step = self.ring.capacity // 8  # values per piece: half the ring's bytes
        for first in range(0, values.size, step):
            _, ticket = self._copy(values[first : first + step], target + first * 4, stream)
            self.done(ticket, stream)

    def _copy(self, values: np.ndarray, target: int | None, stream: int) -> tuple[int, int]:
        """Through a pinned region to `target` (None: the ring's own device region):
        (target, ticket)."""
        nbytes = values.size * 4
        offset = self._alloc(max(nbytes, 1))
        start = offset // 4
        self._host[start : start + values.size] = values  # casts; the region's last reader ran
        if target is None:
            target = self._device_buf.ptr + offset
        driver.copy_to_device(target, self._pinned.ptr + offset, nbytes, stream)
        return target, offset

    def done(self, ticket: int, stream: int) -> None:
        """The work reading upload `ticket` is queued on `stream`: reclaim it once that ran."""
        consumed = self._spare_events.pop() if self._spare_events else driver.Event()
        consumed.record(stream)
        self._in_flight.append((ticket, consumed))

    def _alloc(self, nbytes: int) -> int:
        self._reclaim()
        offset = self.ring.alloc(nbytes)
        while offset is None:  # every region is still in use by queued work: wait for the oldest
            self.waits += 1
            self._in_flight[0][1].synchronize()
            self._reclaim()
            offset = self.ring.alloc(nbytes)
        return offset

    def _reclaim(self) -> None:
        while self._in_flight and self._in_flight[0][1].query():
            ticket, consumed = self._in_flight.popleft()
            self.ring.free(ticket)
            self._spare_events.append(consumed)
