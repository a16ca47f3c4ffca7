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
    called after every change (it wakes the engine that reads the state).
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
            if self.notify is not None:
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


class TransferFailed(RuntimeError):
    """Raised by KVSender/KVReceiver methods on a room that has failed."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure
