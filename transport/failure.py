"""Why a room or a request failed: a kind, which metrics, HTTP statuses and bench tables are
derived from, and a detail, the readable text users and logs see.

The kinds are few and fixed, so they make bounded metric labels; the detail names the values
involved (a peer's address, a deadline, the field that did not match) and is never parsed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FailureKind(str, enum.Enum):
    ABORTED = "aborted"  # given up on this side: an engine, a client, a stopping daemon
    PEER_ABORTED = "peer_aborted"  # the other side failed or aborted the room and said why
    PEER_LOST = "peer_lost"  # a peer went silent, its connection or endpoint broke
    TIMEOUT = "timeout"  # a deadline passed: registration, transfer, request
    INCOMPATIBLE = "incompatible"  # layouts or addresses that cannot work together
    REFUSED = "refused"  # a peer would not take the room or the prompt
    RING_FULL = "ring_full"  # the staging ring had no room for a chunk for too long
    BAD_MESSAGE = "bad_message"  # a peer's message or data did not fit the room
    DATA_PLANE = "data_plane"  # a UCX send or receive failed
    INTERNAL = "internal"  # handling the room raised (contained; the thread goes on)
    RANK_EXITED = "rank_exited"  # a rank process or its transfer thread is gone
    OTHER_RANK = "other_rank"  # another TP rank failed the room (its own counters say why)
    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked
    UNAVAILABLE = "unavailable"  # the daemon is not serving now (starting, stopping, no prefill)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return self.detail


def aborted(detail: str) -> Failure:
    return Failure(FailureKind.ABORTED, detail)


def timeout(detail: str) -> Failure:
    return Failure(FailureKind.TIMEOUT, detail)


def ring_full(waited_s: float) -> Failure:
    return Failure(FailureKind.RING_FULL, f"ring full: no staging room for {waited_s:g}s")
