"""Room states: one request's KV transfer between its prefill and decode ranks."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from kvferry.transport.failure import Failure


class KVPoll(enum.IntEnum):
    """Bootstrapping -> WaitingForInput -> Transferring -> Success | Failed (forward only)."""

    Bootstrapping = 0
    WaitingForInput = 1
    Transferring = 2
    Success = 3
    Failed = 4


class RoomStatus:
    """A room's state on one rank: moves forward only; Failed is sticky and keeps its failure.

    Written by the agent thread; read by any thread (single attribute reads). `notify` is
    called after every change an engine acts on (it wakes the engine that reads the state):
    registered, done, failed. The move to Transferring is not one of them: no engine does
    anything then, and waking one would take the GIL from the transfer thread in mid-transfer.
    """

    __slots__ = ("created", "failure", "notify", "reached", "state")

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self.state = KVPoll.Bootstrapping
        self.reached = KVPoll.Bootstrapping  # the furthest state before any failure
        self.failure: Failure | None = None
        self.created = time.monotonic()
        self.notify = notify

    @property
    def finished(self) -> bool:
        return self.state in (KVPoll.Success, KVPoll.Failed)

    def advance(self, state: KVPoll) -> None:
        """Move to `state` if it is ahead; a finished room stays where it is."""
        if not self.finished and state > self.state:
            assert state != KVPoll.Failed, "use fail() to fail a room"
            self.state = self.reached = state
            if self.notify is not None and state != KVPoll.Transferring:
                self.notify()

    def fail(self, failure: Failure) -> bool:
        """Fail the room; False (and nothing changes) if it had already finished."""
        if self.finished:
            return False
        self.failure = failure
        self.state = KVPoll.Failed
        if self.notify is not None:
            self.notify()
        return True


# A step looks at every room this often even without news of it: timeouts need no event.
ROOM_SWEEP_S = 0.1


class RoomVisits:
    """Which rooms a step must look at: those something happened to since the last step
    (`touch`), and every room once per sweep period. A turn then costs the rooms it concerns,
    not every room open: under load most rooms are waiting, each for its own event."""

    def __init__(self, sweep_s: float = ROOM_SWEEP_S) -> None:
        self._sweep_s = sweep_s
        self._touched: set[int] = set()
        self._next_sweep = 0.0

    def touch(self, room: int) -> None:
        self._touched.add(room)

    def take(self, rooms: dict[int, object], now: float) -> list[int]:
        """The ids to visit now (all of `rooms` when a sweep is due); forgets them."""
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_s
            self._touched.clear()
            return list(rooms)
        return self.take_touched()

    def take_touched(self) -> list[int]:
        """The ids touched since the last take; forgets them."""
        touched = list(self._touched)
        self._touched.clear()
        return touched


class TransferFailed(RuntimeError):
    """Raised by KVSender/KVReceiver methods on a room that has failed."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure
