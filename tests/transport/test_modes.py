"""The two ways KV is packed into messages, behind one contract: staged (one bulk message per
piece, through the ring) and slice (one message per plane and token, cache row to cache row)."""

import numpy as np
import torch

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.plan import HeadSlice
from kvferry.transport import staged_mode
from kvferry.transport.config import TransferConfig
from kvferry.transport.failure import FailureKind
from kvferry.transport.recv_room import Arrival, Piece
from kvferry.transport.slice_mode import SliceMode
from kvferry.transport.staged_mode import StagedMode


class _Room:
    num_chunks, groups, num_tokens = 3, [range(0, 2), range(2, 4)], 40


def _planes():
    cache = torch.arange(8 * 6 * 4 * 2, dtype=torch.float32).reshape(8, 6, 4, 2)  # 4 layers
    return cache, KVPlanes.from_cache(cache)


def test_messages_a_room_expects_in_each_mode():
    _, planes = _planes()
    staged, sliced = StagedMode(staging=None, copies=None), SliceMode()
    assert staged.messages_per_piece(planes, 16) == 1
    assert staged.messages_per_writer(_Room(), planes.num_planes) == 3 * 2
    assert sliced.messages_per_piece(planes, 16) == 8 * 16  # a row per plane and token
    assert sliced.messages_per_writer(_Room(), planes.num_planes) == 40 * 8


def test_a_slice_lands_in_its_cache_row():
    cache, planes = _planes()
    slots = np.array([5, 1, 3])
    heads = HeadSlice(src_rank=0, dst_rank=0, src_head_start=0, dst_head_start=1, num_heads=2)
    # message 4 of the piece: plane 4 // 3 = 1, token 4 % 3 = 1, so slot 1
    arrival = Arrival(None, Piece(heads, slots, planes, 4, 0))
    assert SliceMode().land(arrival, nbytes=2 * 2 * 4)
    arrival.region.fill_(-1)
    assert bool((cache[1, 1, 1:3] == -1).all()) and int((cache == -1).sum()) == 4
    assert SliceMode().received(arrival, last=True) is None  # nothing left to do once it is in


def test_only_the_staged_mode_needs_ring_room():
    config = TransferConfig(staging_bytes=1024)
    staged = StagedMode(staging=None, copies=None)
    assert staged.ring_too_small(1024, config) is None
    failure = staged.ring_too_small(1025, config)
    assert failure.kind is FailureKind.INCOMPATIBLE and "1025 bytes" in failure.detail
    assert SliceMode().ring_too_small(1 << 40, config) is None


class _Copies:
    """Records what the staged mode asks of its copy stream, in order."""

    def __init__(self):
        self.calls = []

    def gather(self, planes, slots, head_start, num_heads, out, after=None, wake=True):
        self.calls.append(("gather", after, wake))
        return object()

    def wake_when_done(self):
        self.calls.append(("wake",))


class _Item:
    """What `StagedMode.stage` reads of an Outgoing."""

    def __init__(self, planes, tokens, fence):
        self.planes, self.slots, self.fence = planes, np.arange(tokens), fence
        self.dest = type("Dest", (), {"slice": HeadSlice(0, 0, 0, 0, 4)})()


def test_gathers_behind_one_fence_wake_the_loop_once_after_the_last(monkeypatch):
    _, planes = _planes()
    copies = _Copies()
    staged = StagedMode(StagingBuffer(1 << 20), copies)
    forward, later = object(), object()  # two forwards' fences
    for fence in (forward, forward, later):
        assert staged.stage(_Item(planes, 4, fence))
    staged.wake()  # the send pipeline, at the end of its staging pass
    staged.wake()  # nothing new since: nothing to wake for
    gathers = [("gather", fence, False) for fence in (forward, forward, later)]
    assert copies.calls == [*gathers[:2], ("wake",), gathers[2], ("wake",)]
    # past COALESCE_BYTES without a wake, the loop is woken at once
    copies.calls.clear()
    monkeypatch.setattr(staged_mode, "COALESCE_BYTES", 2 * planes.staging_bytes(4, 4))
    for _ in range(3):
        assert staged.stage(_Item(planes, 4, forward))
    staged.wake()
    assert [c[0] for c in copies.calls] == ["gather", "gather", "wake", "gather", "wake"]
