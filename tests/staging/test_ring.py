import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvferry.staging.ring import RingAllocator


def test_allocations_are_contiguous_and_aligned():
    ring = RingAllocator(4096, alignment=256)
    assert [ring.alloc(n) for n in (1, 256, 300)] == [0, 256, 512]
    assert ring.used_bytes == 1024
    assert ring.num_allocations == 3


def test_wrap_charges_skipped_tail_until_reclaimed():
    ring = RingAllocator(1024, alignment=256)
    a, b, c = ring.alloc(256), ring.alloc(256), ring.alloc(256)
    ring.free(a)
    assert ring.used_bytes == 512
    # 256 bytes left at the end: a 512-byte request wraps to 0 only if [0, tail) fits it
    assert ring.alloc(512) is None
    ring.free(b)
    d = ring.alloc(512)
    assert d == 0
    assert ring.used_bytes == 1024  # c (256) + skipped tail (256) + d (512)
    ring.free(c)  # the tail passes c and the skipped bytes
    assert ring.used_bytes == 512
    ring.check()
    ring.free(d)
    assert ring.used_bytes == 0


def test_out_of_order_frees_reclaim_fifo():
    ring = RingAllocator(1024, alignment=256)
    a, b = ring.alloc(512), ring.alloc(512)
    ring.free(b)  # not reclaimable yet: a is older
    assert ring.used_bytes == 1024
    assert ring.num_allocations == 1
    assert ring.alloc(256) is None
    ring.free(a)
    assert ring.used_bytes == 0


def test_empty_ring_accepts_capacity_after_any_history():
    ring = RingAllocator(1024, alignment=256)
    ring.free(ring.alloc(768))  # head would sit at 768 if it were kept (stale watermark)
    assert ring.alloc(1024) == 0
    assert ring.alloc(256) is None


def test_full_ring_refuses_then_recovers():
    ring = RingAllocator(512, alignment=256)
    a, b = ring.alloc(256), ring.alloc(256)
    assert ring.alloc(1) is None
    ring.free(a)
    assert ring.alloc(256) == 0  # wraps with nothing skipped
    ring.free(b)
    ring.check()
    assert ring.high_water_bytes == 512


@pytest.mark.parametrize("size", [0, -1, 1.5, "8", True])
def test_bad_sizes_raise(size):
    ring = RingAllocator(1024)
    with pytest.raises(ValueError, match="positive int"):
        ring.alloc(size)


def test_oversized_request_fails_at_once():
    with pytest.raises(ValueError, match="exceeds ring capacity 1024"):
        RingAllocator(1024).alloc(1025)


def test_unknown_or_double_free_changes_nothing():
    ring = RingAllocator(1024)
    a = ring.alloc(10)
    with pytest.raises(KeyError):
        ring.free(a + 1)
    ring.free(a)
    with pytest.raises(KeyError):
        ring.free(a)
    assert (ring.used_bytes, ring.num_allocations) == (0, 0)


@pytest.mark.parametrize("capacity, alignment", [(1000, 256), (0, 256), (1024, 3)])
def test_bad_construction(capacity, alignment):
    with pytest.raises(ValueError):
        RingAllocator(capacity, alignment)


class RingMachine(RuleBasedStateMachine):
    """Random alloc/free interleavings: live regions stay disjoint, aligned and in bounds."""

    def __init__(self):
        super().__init__()
        self.ring = RingAllocator(64 * 256, alignment=256)
        self.live: dict[int, int] = {}  # offset -> requested size

    @rule(size=st.integers(1, 64 * 256))
    def alloc(self, size):
        was_empty = not self.live and self.ring.used_bytes == 0
        offset = self.ring.alloc(size)
        if was_empty:
            assert offset == 0  # an empty ring accepts anything up to capacity
        if offset is not None:
            assert offset % 256 == 0 and offset + size <= self.ring.capacity
            self.live[offset] = size

    @rule(size=st.integers(1, 8 * 256))
    def alloc_small(self, size):
        self.alloc(size)

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10**6))
    def free(self, pick):
        offset = sorted(self.live)[pick % len(self.live)]
        self.ring.free(offset)
        del self.live[offset]

    @invariant()
    def regions_disjoint(self):
        spans = sorted((o, o + s) for o, s in self.live.items())
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        self.ring.check()
        assert self.ring.num_allocations == len(self.live)
        assert self.ring.used_bytes >= sum(-(-s // 256) * 256 for s in self.live.values())

    def teardown(self):
        for offset in list(self.live):
            self.ring.free(offset)
        assert self.ring.used_bytes == 0 and self.ring.num_allocations == 0


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=200), st.randoms())
def test_free_everything_returns_to_empty(sizes, rnd):
    ring = RingAllocator(16 * 4096, alignment=256)
    offsets = [o for o in (ring.alloc(n) for n in sizes) if o is not None]
    rnd.shuffle(offsets)
    for offset in offsets:
        ring.free(offset)
    assert ring.used_bytes == 0
    assert ring.alloc(ring.capacity) == 0
