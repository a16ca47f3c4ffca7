"""A prefill daemon's intake of prompts from decode daemons (`SubmitPrompt` at its bootstrap
server), and the rooms it has taken until their ranks report them done.

A prompt is checked as the HTTP front checks one, refused when its room is already in use or its
host has too many prompts waiting for their rooms' registration (`PromptQuota`), and otherwise
handed to rank 0 as `Submit`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.server import protocol
from kvferry.daemon.server.prompt_quota import PromptQuota
from kvferry.daemon.server.protocol import Snapshot
from kvferry.transport.messages import Ack, ErrorReply, PrefillLoad, SubmitPrompt


class PromptIntake:
    """`refusal()`: why the daemon takes no prompt now (None while serving); `check(prompt)`:
    raises ValueError for a prompt it cannot serve; `send(command)`: to rank 0."""

    def __init__(
        self,
        quota: PromptQuota,
        refusal: Callable[[], str | None],
        check: Callable[[list[int]], None],
        send: Callable[[protocol.Submit], None],
    ) -> None:
        self.quota, self._refusal, self._check, self._send = quota, refusal, check, send
        self.rooms: dict[int, int] = {}  # room -> its prompt's tokens
        self.prompt_tokens = 0  # of every room taken
        # the rooms and the quota: the bootstrap thread takes, the daemon's loop releases
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self.rooms)

    def submit(self, message: SubmitPrompt, peer: str) -> Ack | ErrorReply:
        """Bootstrap-server thread: a decode daemon's prompt for room `message.room`, from the
        host `peer`. Held by the ranks until a decode rank registers the room."""
        room = message.room
        refusal = self._refusal()
        if refusal:
            return ErrorReply(refusal, room=room)
        try:
            self._check(message.prompt)
            params = SamplingParams(1, message.temperature, message.top_p, message.seed)
        except ValueError as exc:
            return ErrorReply(str(exc), room=room)
        with self._lock:
            if room in self.rooms:
                return ErrorReply(f"room {room} is already in use", room=room)
            refused = self.quota.take(room, peer)
            if refused:
                return ErrorReply(f"prompt refused: {refused}", room=room, busy=True)
            self.rooms[room] = len(message.prompt)
            self.prompt_tokens += len(message.prompt)
        self._send(protocol.Submit(room, message.prompt, params))
        return Ack()

    def registered(self, rooms: list[int]) -> None:
        """A decode rank registered these rooms: their prompts no longer count against the
        quota (rooms this intake never took are ignored)."""
        with self._lock:
            for room in rooms:
                self.quota.release(room)

    def done(self, room: int) -> None:
        """The ranks are done with `room`, delivered or failed."""
        with self._lock:
            self.prompt_tokens -= self.rooms.pop(room, 0)
            self.quota.release(room)

    def load(self, snapshots: list[Snapshot]) -> PrefillLoad:
        """What the bootstrap server reports to decode daemons choosing a prefill: the prompts
        taken and not done, and the free KV pages of the fullest rank (its latest snapshot)."""
        free = min((s.kv_pages_total - s.kv_pages_used for s in snapshots), default=0)
        with self._lock:
            return PrefillLoad(len(self.rooms), self.prompt_tokens, free)
