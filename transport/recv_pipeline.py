"""Decode rank's receive pipeline: each data message goes from a probe, through checks against
its room, to where its mode lands it (a region of the staging ring: `staged_mode.py`), through
what its mode does once it is in (a scatter into the paged KV cache, queued on the copy
stream: the message has landed then), to its release once the scatter has run.

Where the data plane chains copies (the native path on a GPU), a message's scatter is written
into its receive before the receive is posted (`StagedMode.chain`), and the receive's completion
launches it: the pipeline then only accounts for what has landed.

Where the data plane can post a receive before its message comes (the native path), a room's
messages get theirs as the room registers (`post_ahead`), its TransferDone notes too: UCX
takes each message in as it arrives and its completion launches the scatter. Each completion
wakes the thread as it comes, not once for the room (a group of the data plane): what it takes
in while later messages travel is then off the path to the room's end, which measured 0.13-0.16
ms shorter that way (docs/benchmarks.md). Data only while the ring stays at most half full;
the rest come by probe. The ring is reclaimed oldest first, so a region held for a
message still to come holds back the reuse of every later one; and that message may itself
wait for the prefill rank's ring, full of messages for this one. So a message that finds the
ring full revokes every receive posted ahead whose message has not begun to arrive (each is
cancelled, its region given back, its message probed once it comes), and none is posted ahead
until the ring has room again.

Every stage is polled, oldest first; nothing waits on the host. A message that finds the ring
full stays queued (later ones behind it) for at most ring_wait_timeout_s, then fails its room.
A message no open room wants is discarded, which releases its sender.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable

from kvferry.staging.kv_copy import KVPlanes
from kvferry.transport.config import TransferConfig
from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import failure
from kvferry.transport.done_notes import DoneNotes
from kvferry.transport.failure import Failure, ring_full
from kvferry.transport.messages import TransferDone
from kvferry.transport.recv_room import Arrival, Piece, RecvRoom
from kvferry.transport.room import KVPoll
from kvferry.transport.tags import DONE_PIECE, pack_tag, unpack_tag
from kvferry.transport.timeline import first, last

PROBES_PER_TURN = 256  # bounds one turn of the loop when many messages are waiting
# receives are posted ahead of their messages only while the ring is at most 1/AHEAD_SHARE full
AHEAD_SHARE = 2


class RecvPipeline:
    def __init__(
        self,
        core: AgentCore,
        config: TransferConfig,
        planes: KVPlanes,
        room_of_key: Callable[[int], RecvRoom | None],
        fail_room: Callable[[RecvRoom, Failure], None],
        touch: Callable[[int], None],
        on_done: Callable[[RecvRoom, TransferDone], None],
    ) -> None:
        """`touch(room id)`: something happened to the room (a message of it is done).
        `on_done`: a prefill rank's TransferDone for the room, taken with its data."""
        self.core, self.config, self.planes, self.mode = core, config, planes, core.mode
        self._room_of_key, self._fail_room, self._touch = room_of_key, fail_room, touch
        self._notes = DoneNotes(core, fail_room, on_done, touch)
        self._receiving: deque[Arrival] = deque()  # receives posted, oldest first
        self._scattering: deque[Arrival] = deque()  # scatters queued, in stream order
        self._discards: deque = deque()  # discards of unwanted messages not yet done
        self._revoked = 0  # receives revoked (cancelled, the ring full) and not yet settled
        self._ring_blocked_since: float | None = None
        # the data plane launches each scatter as its receive completes (native receives)
        self._chains = core.data.chains_copies and self.mode.chains
        # ... and takes receives posted ahead; by default where the cache is on a GPU
        wanted = config.post_receives_ahead
        wanted = planes.device.type == "cuda" if wanted is None else wanted
        self._posts_ahead = self._chains and wanted and core.data.posts_ahead

    def prepare(self, room: RecvRoom) -> None:
        """A room registers: what its messages' chained scatters need, ready before they come."""
        if self._chains:
            self.mode.prepare(room, self.planes)

    def post_ahead(self, room: RecvRoom, now: float) -> None:
        """As `room` registers: post its notes' receives, and its data's where messages are of
        one chunk (a decode rank that takes several in one message cannot know their sizes
        before) while the ring stays at most 1/AHEAD_SHARE full. Not as a group of the data
        plane: each completion is taken as it comes (see the module's docstring)."""
        if not self._posts_ahead:
            return
        self._notes.expect(room)
        if room.max_message_bytes or self._ring_blocked_since is not None:
            return
        ring = self.core.staging.ring
        limit = ring.capacity // AHEAD_SHARE
        for piece, writer, piece_of, nbytes in room.messages(self.planes):
            if ring.used_bytes + nbytes > limit:
                return
            arrival = Arrival(room, piece_of)
            if not self._expect(arrival, pack_tag(room.key, piece, writer), nbytes, now):
                return

    def _expect(self, arrival: Arrival, tag: int, nbytes: int, now: float) -> bool:
        """Post the receive of `arrival`'s message (`tag`, `nbytes`); False if none was."""
        if not self.mode.land(arrival, nbytes):
            return False
        arrival.room.take(arrival.piece)
        try:
            request = self.core.data.expect(
                tag, arrival.region, functools.partial(self.mode.chain, arrival)
            )
        except BaseException:
            self._unpost(arrival)
            raise
        if request is None:  # no record free: the message will come by probe
            self._unpost(arrival)
            return False
        arrival.request, arrival.started, arrival.ahead = request, now, True
        arrival.room.busy += 1
        self._receiving.append(arrival)
        self.core.stats.receives_ahead += 1
        return True

    def _unpost(self, arrival: Arrival) -> None:
        """Undo what went before a receive not posted after all, or revoked before its message."""
        self.mode.abandon(arrival)  # nothing was posted: nothing was launched
        self.core.staging.free(arrival.offset)
        arrival.room.untake(arrival.piece)

    def cancel_ahead(self, room: RecvRoom | None = None) -> None:
        """Cancel the receives posted ahead for `room` (it failed: its notes' too), or the data's
        of every room (None: revoked, see the module's docstring); each completes, cancelled (or
        with its message, had that begun to arrive), and its region goes back then."""
        if room is not None:
            self._notes.cancel(room)
        for arrival in self._receiving:
            if arrival.ahead and not arrival.revoked and (room is None or arrival.room is room):
                arrival.revoked = room is None
                self._revoked += arrival.revoked
                self.core.data.cancel(arrival.request)

    @property
    def busy(self) -> bool:
        """Operations in flight that the loop must look at soon. Not receives posted ahead
        for open rooms (UCX's descriptor tells when one completes, however long that takes),
        nor scatters queued unless a failed room waits for them (each finishes on the device
        by itself; its region goes back in the next turn; a ring wait asks a wake)."""
        if self._discards or self._notes.busy or self._ring_blocked_since is not None:
            return True
        if any(not arrival.ahead or not arrival.room.open for arrival in self._receiving):
            return True
        return any(arrival.room.failing for arrival in self._scattering)

    def step(self, now: float) -> None:
        """Advance every message that can move."""
        self._take_arrivals(now)
        self._notes.finish()
        self._finish_receives()
        self._finish_scatters()
        if self._ring_blocked_since is not None:
            # the scatters that free ring room now have a waiter: asked for after the receives'
            # completions are taken, so that it covers the scatters their completions launched
            self.core.copies.wake_when_done()
        while self._discards and self._discards[0].done():
            self._discards.popleft()
        self.core.messages_wake = self._ring_blocked_since is None

    def _take_arrivals(self, now: float) -> None:
        """Take what arrived, oldest first: after a progress (only then can one be new), or
        while the oldest waits for ring room."""
        if not (self.core.progressed or self._ring_blocked_since is not None):
            return
        if self._revoked:
            self._settle_revoked()
        for _ in range(PROBES_PER_TURN):
            probed = self.core.data.probe()
            if probed is None:
                return
            tag, nbytes = probed
            try:
                taken = self._arrive(tag, nbytes, now)
            except Exception as exc:  # one message's failure is its room's, never the thread's
                if not self._contain(tag, exc):
                    return
                continue
            if not taken:
                return
        self.core.again = True  # the budget ran out: the rest in the next turn

    def _settle_revoked(self) -> None:
        """Give back the pieces of the receives revoked whose cancellation is in, before any
        probe: their messages come by probe now, and may be in already (the progress that took
        the cancellations in can bring them too), where they must not pass for duplicates."""
        for _ in range(len(self._receiving)):  # a full turn of the deque keeps its order
            arrival = self._receiving.popleft()
            if not self._given_back(arrival):
                self._receiving.append(arrival)

    def _given_back(self, arrival: Arrival) -> bool:
        """Whether `arrival` was revoked and cancelled before its message came (its room still
        open); if so its region and piece go back, and its message, when it comes, is probed."""
        if not (arrival.revoked and arrival.request.cancelled and arrival.room.open):
            return False
        self._unpost(arrival)
        arrival.room.busy -= 1
        self._revoked -= 1
        return True

    def _arrive(self, tag: int, nbytes: int, now: float) -> bool:
        """Take or discard the message probed; False if it must stay queued (ring full)."""
        key, piece, writer = unpack_tag(tag)
        room = self._room_of_key(key)
        if room is None or not room.open:
            self.core.stats.unexpected_messages += 1
            self._discards.append(self.core.data.discard(tag))
            return True
        if piece == DONE_PIECE:
            discard = self._notes.take(room, tag, nbytes, writer)
            if discard is not None:
                self._discards.append(discard)
            return True
        error, piece_of = room.expect(piece, writer, nbytes, self.planes, self.mode)
        if error:
            self._discards.append(self.core.data.discard(tag))
            self._fail_room(room, error)
            return True
        self.core.peers.heard(room.rank_peers[writer])  # data counts as a sign of life
        if not self._take(room, tag, nbytes, piece_of, now):
            room.untake(piece_of)  # not taken after all: it stays queued
            return False
        return True

    def _contain(self, tag: int, exc: Exception) -> bool:
        """Fail the room of a message whose handling raised, and discard the message (its
        sender is released; were it left queued, every probe would find it again). False if
        even the discard raised: the message stays, and this turn takes no more."""
        contained = self.core.contain(exc, f"data message {tag:#x}")
        room = self._room_of_key(unpack_tag(tag)[0])
        if room is not None:
            self._fail_room(room, contained)
        try:
            self._discards.append(self.core.data.discard(tag))
        except Exception as discard_exc:
            self.core.contain(discard_exc, f"discarding data message {tag:#x}")
            return False
        return True

    def _take(self, room: RecvRoom, tag: int, nbytes: int, piece: Piece, now: float) -> bool:
        arrival = Arrival(room, piece)
        if not self.mode.land(arrival, nbytes):
            return self._ring_full(room, now)
        self._ring_unblocked(now)
        chain = functools.partial(self.mode.chain, arrival) if self._chains else None
        try:
            arrival.request = self.core.data.recv(tag, arrival.region, chain)
        except BaseException:
            self.mode.abandon(arrival)  # nothing was posted: nothing was launched
            if arrival.offset is not None:  # nothing was posted into it
                self.core.staging.free(arrival.offset)
            raise
        arrival.started = now
        first(room.marks, "first_data")
        room.busy += 1
        room.status.advance(KVPoll.Transferring)
        self._receiving.append(arrival)
        return True

    def _ring_full(self, room: RecvRoom, now: float) -> bool:
        if self._ring_blocked_since is None:
            self.cancel_ahead()  # their regions may be what holds the ring
            self._ring_blocked_since = now
            self.core.stats.ring_waits += 1
        elif now - self._ring_blocked_since > self.config.ring_wait_timeout_s:
            self._fail_room(room, ring_full(self.config.ring_wait_timeout_s))
            self._ring_blocked_since = None
        return False

    def _ring_unblocked(self, now: float) -> None:
        if self._ring_blocked_since is not None:
            self.core.stats.ring_wait_s += now - self._ring_blocked_since
        self._ring_blocked_since = None

    def _finish_receives(self) -> None:
        for _ in range(len(self._receiving)):
            arrival = self._receiving.popleft()
            if not arrival.request.done():
                self._receiving.append(arrival)
                continue
            if self._given_back(arrival):
                continue
            error, room = arrival.request.error(), arrival.room
            self._revoked -= arrival.revoked  # too late to cancel, or its room failed
            finished = time.monotonic()
            if not arrival.ahead:  # one posted ahead waited for its message to be sent too
                self.core.stats.wire_s += finished - arrival.started
            arrival.started = finished
            if error or not room.open:
                if error:
                    self._fail_room(room, failure("receive", error))
                arrival.fence = self.mode.abandon(arrival)
                if arrival.fence is None:
                    self._release(arrival)
                else:  # launched all the same: the region is free once it has run
                    self._scattering.append(arrival)
                continue
            at = arrival.request.finished_at  # when the plane says it came, if it does
            if arrival.ahead:  # what its post would have marked, had the message come first
                self.core.data.count_received(arrival.region.numel())
                first(room.marks, "first_data", at)
                room.status.advance(KVPoll.Transferring)
                self.core.peers.heard(room.rank_peers[arrival.piece.slice.src_rank])
            last(room.marks, "received_data", at)
            room.received_units += arrival.piece.units
            # No scatter wakes the loop when it finishes: the room can succeed before that (its
            # engine orders its own stream after `kv_fence`), and a finished scatter's region
            # goes back in the next turn, whatever wakes it (a ring wait asks for its own wake;
            # a failed room waiting for its scatters keeps the loop's timer short).
            last_one = room.received_units >= room.units(self.mode, self.planes.num_planes)
            arrival.fence = self.mode.received(arrival, last=last_one)
            room.landed_units += arrival.piece.units
            if arrival.fence is None:  # in place already
                self._release(arrival)
                continue
            room.kv_fence = arrival.fence
            last(room.marks, "scatter_queued")
            self._scattering.append(arrival)
            if last_one:  # it may succeed now, in this turn, not once the scatter has run
                self._touch(room.room)

    def _finish_scatters(self) -> None:
        while self._scattering and self._scattering[0].fence.done():
            arrival = self._scattering.popleft()
            self.core.stats.copy_s += time.monotonic() - arrival.started
            self._release(arrival)
        self.core.copies.take_fired()  # their events back to the pool, woken or not

    def _release(self, arrival: Arrival) -> None:
        if arrival.offset is not None:
            self.core.staging.free(arrival.offset)
            arrival.offset = None
        arrival.room.busy -= 1
        self._touch(arrival.room.room)
