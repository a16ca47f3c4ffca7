"""Rooms a prefill rank has finished with, remembered for a while: a late registration or abort
must not open one again, and an engine claiming one late must find it failed.

Bounded in number (the oldest are forgotten first) and in time; expiry looks at the oldest end
only, so an idle rank's turn costs the same with many tombstones as with none.
"""

from __future__ import annotations

from collections import OrderedDict

from kvferry.transport.failure import Failure

KEEP_S = 600.0  # how long a finished room is remembered
MAX_TOMBSTONES = 8192


class Tombstones:
    def __init__(self, keep_s: float = KEEP_S, limit: int = MAX_TOMBSTONES) -> None:
        self.keep_s, self.limit = keep_s, limit
        self._reasons: OrderedDict[int, tuple[Failure, float]] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._reasons)

    def __contains__(self, room: int) -> bool:
        return room in self._reasons

    def reason(self, room: int) -> Failure | None:
        """Why `room` finished, if it is remembered."""
        entry = self._reasons.get(room)
        return None if entry is None else entry[0]

    def bury(self, room: int, reason: Failure, now: float) -> None:
        self._reasons[room] = (reason, now)
        self._reasons.move_to_end(room)
        if len(self._reasons) > self.limit:
            self._reasons.popitem(last=False)

    def pop(self, room: int) -> Failure | None:
        """Forget `room`; why it finished, if it was remembered."""
        entry = self._reasons.pop(room, None)
        return None if entry is None else entry[0]

    def expire(self, now: float) -> None:
        while self._reasons:
            _, buried = next(iter(self._reasons.values()))
            if now - buried <= self.keep_s:
                return
            self._reasons.popitem(last=False)
