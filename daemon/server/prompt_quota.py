"""How many prompts a prefill daemon holds for rooms no decode rank has registered yet.

Anyone who reaches the bootstrap port can submit a prompt. The ranks run no forward for it until
a decode rank registers its room, but each held prompt still takes memory, so they are bounded:
per submitting host (the address ZeroMQ saw) and in total. A prompt stops counting once its room
is registered on every prefill rank, or once it is gone.
"""

from __future__ import annotations


class PromptQuota:
    """Rooms held per peer; not thread-safe (the daemon calls it under its lock)."""

    def __init__(self, per_peer: int, total: int) -> None:
        if per_peer < 1 or total < 1:
            raise ValueError(f"per_peer={per_peer} and total={total} must be >= 1")
        self.per_peer, self.total = per_peer, total
        self._peer_of: dict[int, str] = {}  # room -> the peer that submitted it
        self._held: dict[str, int] = {}  # peer -> rooms of it held (no entry at 0)

    def __len__(self) -> int:
        return len(self._peer_of)

    def take(self, room: int, peer: str) -> str | None:
        """Count `room` against `peer`; why it cannot be held, or None when taken."""
        held = self._held.get(peer, 0)
        if held >= self.per_peer:
            return (
                f"{peer} already has {held} prompts waiting for their rooms' registration "
                f"(scheduler.max_unregistered_prompts_per_peer={self.per_peer})"
            )
        if len(self._peer_of) >= self.total:
            return (
                f"{len(self._peer_of)} prompts are waiting for their rooms' registration "
                f"(scheduler.max_unregistered_prompts={self.total})"
            )
        self._peer_of[room] = peer
        self._held[peer] = held + 1
        return None

    def release(self, room: int) -> None:
        """`room` was registered, or is gone; unknown rooms are ignored."""
        peer = self._peer_of.pop(room, None)
        if peer is None:
            return
        left = self._held[peer] - 1
        if left:
            self._held[peer] = left
        else:
            del self._held[peer]
