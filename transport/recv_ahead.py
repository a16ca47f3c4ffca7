"""The rooms of a decode rank whose data messages are still to be posted ahead (see
recv_pipeline.py): as each registers, and again whenever the ring frees, what fits of their
messages is posted, oldest room first, for as long as the ring stays at most 1/AHEAD_SHARE full.
Their order is the order the rooms registered, which is the order their prompts reach prefill:
under load the rooms next in line take their data with receives posted before it comes, not only
those that registered while the ring was empty."""

from __future__ import annotations

from collections.abc import Callable

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.kv_copy import KVPlanes
from kvferry.transport.recv_room import Arrival, RecvRoom
from kvferry.transport.tags import pack_tag

# receives are posted ahead of their messages only while the ring is at most 1/AHEAD_SHARE full
AHEAD_SHARE = 2


class DueRooms:
    def __init__(
        self,
        staging: StagingBuffer | None,
        planes: KVPlanes,
        expect: Callable[[Arrival, int, int, float], bool],
        fail_room: Callable[[RecvRoom, Exception], None],
    ) -> None:
        """`staging`: the rank's ring (None: a mode without one posts nothing ahead);
        `expect(arrival, tag, bytes, now)`: post the receive of one message ahead, False if none
        was; `fail_room(room, exc)`: posting a room's receives raised `exc`."""
        self._staging, self._planes = staging, planes
        self._expect, self._fail_room = expect, fail_room
        self._rooms: dict[RecvRoom, None] = {}  # in registration order

    def __len__(self) -> int:
        return len(self._rooms)

    def add(self, room: RecvRoom) -> None:
        self._rooms[room] = None

    def clear(self) -> None:
        """The ring filled up: the rooms' messages not yet posted come by probe."""
        self._rooms.clear()

    def post(self, now: float) -> None:
        """Post what fits, oldest room first; a room leaves once none of its messages is left to
        post (or it closed, or posting raised: its failure)."""
        while self._rooms:
            room = next(iter(self._rooms))
            try:
                if room.open and not self._post_room(room, now):
                    return
            except Exception as exc:  # one room's failure is its own, never the thread's
                self._fail_room(room, exc)
            del self._rooms[room]

    def _post_room(self, room: RecvRoom, now: float) -> bool:
        """Post the receives of `room`'s messages not yet taken; False if one that could fit
        later did not. One larger than the ring's share never does: it comes by probe."""
        ring = self._staging.ring
        limit = ring.capacity // AHEAD_SHARE
        for piece, writer, piece_of, nbytes in room.messages(self._planes):
            if room.taken.get((piece, writer)) or nbytes > limit:
                continue
            if ring.used_bytes + nbytes > limit:
                return False
            tag = pack_tag(room.key, piece, writer)
            if not self._expect(Arrival(room, piece_of), tag, nbytes, now):
                return False
        return True
