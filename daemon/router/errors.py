"""The router's failures as values, and its own error answers in OpenAI's shape
(`{"error": {"message", "type", "code"}}`, as the decode daemons answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum


class AttemptKind(str, Enum):
    """Why one attempt on a decode daemon failed before its client got any byte."""

    UNREACHABLE = "unreachable"  # no connection (refused, reset, connect timeout)
    DROPPED = "dropped"  # the connection ended before the answer (a stream's first event)
    REFUSED = "refused"  # 500, 502 or 503, or a stream whose first event is such an error
    TIMEOUT = "timeout"  # the request's time ran out


@dataclass(frozen=True)
class AttemptFailure:
    target: str
    kind: AttemptKind
    detail: str

    @property
    def retryable(self) -> bool:
        """Worth another decode daemon: anything but the request's own time running out."""
        return self.kind is not AttemptKind.TIMEOUT

    def __str__(self) -> str:
        return f"{self.target}: {self.detail}"


class RouterError(Exception):
    """An answer the router gives itself: HTTP status, OpenAI error type, and a code."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code=None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    @classmethod
    def no_route(cls, method: str, path: str) -> RouterError:
        where = path if method == "GET" else f"{method} {path}"
        return cls(404, f"no such path: {where}", "not_found")

    @classmethod
    def no_target(cls, why: str) -> RouterError:
        return cls(503, f"no decode daemon can take the request: {why}", "unavailable")

    @classmethod
    def attempts_failed(
        cls, failures: list[AttemptFailure], timed_out: bool, left: str | None = None
    ) -> RouterError:
        """Every attempt failed: 504 if the request's time ran out, else 502; the message
        names each attempt, and why no other target was tried (`left`)."""
        tried = "; ".join(str(failure) for failure in failures)
        tried += f"; no other target: {left}" if left else ""
        count = f"{len(failures)} attempt{'' if len(failures) == 1 else 's'}"
        if timed_out:
            return cls(504, f"request timed out after {count}: {tried}", "timeout", "timeout")
        return cls(502, f"no decode daemon answered ({count}): {tried}", "server_error", "router")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code}}

    def event(self) -> bytes:
        """As the last event of a stream that broke, then the stream's end."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\ndata: [DONE]\n\n"
