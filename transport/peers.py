"""Liveness of control-plane peers: when each was last heard from, and which rooms it holds.

Only peers holding rooms are tracked: a frame from anyone else leaves no trace here."""

from __future__ import annotations

import time


class PeerTracker:
    """Heartbeats go to every peer sharing a live room; a peer silent for longer than the
    timeout is declared dead (its rooms fail)."""

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._last_heard: dict[str, float] = {}
        self._rooms: dict[str, set[int]] = {}
        self._next_beat = 0.0

    def heard(self, peer: str, now: float | None = None) -> None:
        if peer in self._rooms:
            self._last_heard[peer] = time.monotonic() if now is None else now

    def add_room(self, peer: str, room: int) -> None:
        if peer not in self._rooms:  # (again): silence while it had no rooms does not count
            self._rooms[peer] = set()
            self._last_heard[peer] = time.monotonic()
        self._rooms[peer].add(room)

    def remove_room(self, peer: str, room: int) -> None:
        rooms = self._rooms.get(peer)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms[peer]
                self._last_heard.pop(peer, None)

    def __len__(self) -> int:
        """Peers whose liveness is tracked."""
        return len(self._last_heard)

    def active(self) -> list[str]:
        """Peers this rank has rooms with (safe to call from any thread)."""
        return sorted(list(self._rooms))  # list() of a dict is one step under the GIL

    def rooms_of(self, peer: str) -> set[int]:
        return set(self._rooms.get(peer, ()))

    def due_heartbeats(self, now: float) -> list[str] | None:
        """Peers to send a heartbeat to now (every interval, to peers sharing rooms); None
        while the next round is not due."""
        if now < self._next_beat:
            return None
        self._next_beat = now + self.interval_s
        return list(self._rooms)

    def silent(self, now: float) -> list[str]:
        """Peers with live rooms that have said nothing for longer than the timeout."""
        return [p for p in self._rooms if now - self._last_heard.get(p, now) > self.timeout_s]

    def forget(self, peer: str) -> None:
        self._rooms.pop(peer, None)
        self._last_heard.pop(peer, None)
