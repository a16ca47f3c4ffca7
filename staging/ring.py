"""Ring allocator: contiguous regions of one pre-allocated staging buffer.

Regions are handed out at the head and reclaimed from the tail in allocation order, so the live
regions always form one contiguous arc [tail, head) of the ring (possibly wrapping once). Frees
may arrive in any order; a freed region is reclaimed once every older region is freed too.

When the bytes between the head and the end of the buffer are too few for a request, the
allocation wraps to offset 0 and those skipped bytes stay charged to the newest region until it
is reclaimed, at which point the tail passes them. An empty ring resets its head to 0, so it
always accepts a capacity-sized request (no stale watermark).

Owned by one thread: no locks.
"""

from __future__ import annotations

from collections import deque


class _Region:
    __slots__ = ("charge", "freed", "offset")

    def __init__(self, offset: int, charge: int) -> None:
        self.offset = offset
        self.charge = charge  # bytes this region holds until reclaimed: size + any skipped tail
        self.freed = False


class RingAllocator:
    """Contiguous, aligned allocations from a buffer of `capacity` bytes, reclaimed FIFO."""

    def __init__(self, capacity: int, alignment: int = 256) -> None:
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment={alignment} must be a power of two")
        if capacity < alignment or capacity % alignment:
            raise ValueError(
                f"capacity={capacity} must be a positive multiple of alignment={alignment}"
            )
        self.capacity = capacity
        self.alignment = alignment
        self.used_bytes = 0
        self.high_water_bytes = 0
        self.num_allocations = 0  # allocated and not yet freed
        self._head = 0
        self._regions: deque[_Region] = deque()  # unreclaimed, oldest first
        self._live: dict[int, _Region] = {}  # offset -> allocated, not yet freed

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new region of at least `nbytes`, or None if it does not fit now."""
        size = self._aligned_size(nbytes)
        offset, skipped = self._place(size)
        if offset is None:
            return None
        if skipped:
            self._regions[-1].charge += skipped
        region = _Region(offset, size)
        self._regions.append(region)
        self._live[offset] = region
        self._head = offset + size
        self.used_bytes += size + skipped
        self.num_allocations += 1
        self.high_water_bytes = max(self.high_water_bytes, self.used_bytes)
        return offset

    def free(self, offset: int) -> None:
        """Release the region at `offset`; raises KeyError (changing nothing) if none is live."""
        region = self._live.pop(offset, None)
        if region is None:
            raise KeyError(f"no live allocation at offset {offset}")
        region.freed = True
        self.num_allocations -= 1
        regions = self._regions
        while regions and regions[0].freed:
            self.used_bytes -= regions.popleft().charge
        if not regions:
            self._head = 0

    def check(self) -> None:
        """Assert the allocator's invariants (cheap enough to run whenever the ring is idle)."""
        span = (self._head - self._regions[0].offset) % self.capacity if self._regions else 0
        if self._regions and span == 0:
            span = self.capacity  # head met tail: the ring is exactly full
        assert self.used_bytes == span, (self.used_bytes, span)
        assert sum(r.charge for r in self._regions) == self.used_bytes
        assert self.num_allocations == len(self._live) == sum(not r.freed for r in self._regions)
        assert self._regions or self._head == 0

    def _aligned_size(self, nbytes: int) -> int:
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise ValueError(f"allocation size must be a positive int, got {nbytes!r}")
        if nbytes > self.capacity:
            raise ValueError(f"allocation of {nbytes} bytes exceeds ring capacity {self.capacity}")
        return -(-nbytes // self.alignment) * self.alignment

    def _place(self, size: int) -> tuple[int | None, int]:
        """(offset, bytes skipped at the end of the buffer) for a region of `size`."""
        if not self._regions:
            return 0, 0
        head, tail = self._head, self._regions[0].offset
        if head > tail:  # live arc does not wrap: free space is [head, capacity) + [0, tail)
            if head + size <= self.capacity:
                return head, 0
            if size <= tail:
                return 0, self.capacity - head
            return None, 0
        # live arc wraps (or the ring is full when head == tail): free space is [head, tail)
        if head + size <= tail:
            return head, 0
        return None, 0
