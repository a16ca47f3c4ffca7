"""When a prefill rank may read a room's first token: the engine hands over a host tensor that
a copy queued after the forward fills, and returns while the device still runs the forward."""

from __future__ import annotations

from collections.abc import Callable

from kvferry.staging.copy_stream import CopyStream
from kvferry.transport.send_room import SendRoom


class FirstTokenWaits:
    """Whether a room's first token may be read, and a wake for the rooms that wait for it.
    A room's own gathers wait for the copy that fills it, so by its last send it is in; a rank
    that sends the room nothing (its heads are another rank's to send) may get there first,
    and asks its copy stream to wake it once the copy has run."""

    def __init__(self, copies: CopyStream, touch: Callable[[int], None]) -> None:
        """`touch(room id)`: visit the room at the next step."""
        self._copies, self._touch = copies, touch
        self._waiting: list[int] = []  # rooms whose first token's copy is waited for

    def readable(self, room: SendRoom) -> bool:
        fence = room.first_token_fence()
        if fence is None or fence.done():
            return True
        if room.first_token_wake is None:
            room.first_token_wake = self._copies.after(fence)
            self._waiting.append(room.room)
        return False

    def touch_arrived(self, rooms: dict[int, SendRoom]) -> None:
        """Visit the rooms whose first token has come in since the last call."""
        if not self._waiting:
            return
        waiting = []
        for room_id in self._waiting:
            room = rooms.get(room_id)
            if room is None or room.status.finished:
                continue
            if room.first_token_wake.done():
                self._touch(room_id)
            else:
                waiting.append(room_id)
        self._waiting = waiting
