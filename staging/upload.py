"""Host-to-device upload of small per-launch index arrays without allocating per call.

Every gather/scatter needs its token slots on the device. Pinning a fresh host tensor per call
costs tens of microseconds and, while the GPU lags behind, makes the caching host allocator
fall back to cudaHostAlloc. Instead one pinned buffer and one device buffer of the same size are
carved by a RingAllocator; a region is reclaimed when the event recorded after its consumer
kernel has fired. Only when the ring is full of unfinished work does an upload wait (counted).
The copies run on the uploader's own stream, so they overlap the work queued before them and
the consumer's stream only waits on an event.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import torch

from kvferry.staging.ring import RingAllocator


class IndexUploader:
    """int32 index arrays to one CUDA device through a pinned ring of `capacity` bytes."""

    def __init__(self, device: torch.device, capacity: int = 4 << 20) -> None:
        self.device = device
        self.ring = RingAllocator(capacity, alignment=256)
        self._host = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        self._host_np = self._host.numpy()
        self._device_buf = torch.empty(capacity, dtype=torch.uint8, device=device)
        self._stream = torch.cuda.Stream(device)
        self._in_flight: deque[tuple[int, torch.cuda.Event]] = deque()  # oldest first
        self.lock = threading.Lock()  # held by a caller across upload() and done()
        self.waits = 0  # uploads that found the ring full and waited for the GPU

    def upload(self, values: np.ndarray) -> tuple[torch.Tensor, int]:
        """(device int32 copy of `values`, ticket for done()), ready for the current stream."""
        nbytes = max(values.size * 4, 4)
        if nbytes > self.ring.capacity:
            raise ValueError(
                f"{values.size} indices exceed the upload ring of {self.ring.capacity} bytes"
            )
        self._reclaim()
        offset = self.ring.alloc(nbytes)
        while offset is None:  # every region is still in use by queued work: wait for the oldest
            self.waits += 1
            self._in_flight[0][1].synchronize()
            self._reclaim()
            offset = self.ring.alloc(nbytes)
        host = self._host_np[offset : offset + values.size * 4].view(np.int32)
        host[:] = values
        source = self._host.narrow(0, offset, values.size * 4).view(torch.int32)
        target = self._device_buf.narrow(0, offset, values.size * 4).view(torch.int32)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            # the region's previous consumer has finished (its event fired), so the copy may
            # start before whatever the consumer stream still has queued
            target.copy_(source, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        consumer.wait_event(copied)
        return target, offset

    def done(self, ticket: int) -> None:
        """The work consuming upload `ticket` is queued on the current stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._in_flight.append((ticket, event))

    def _reclaim(self) -> None:
        while self._in_flight and self._in_flight[0][1].query():
            self.ring.free(self._in_flight.popleft()[0])
