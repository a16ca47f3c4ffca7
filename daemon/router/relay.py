"""A decode daemon's stream passed on to the client: read up to its first event before anything
is sent (until then a failure may still go to another daemon), then event by event as it
arrives.

Only whole events go out (cut after their blank line), so a stream that breaks mid-event ends
with the error event on a line of its own, never glued to half an event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

from kvferry.daemon.router.errors import RouterError
from kvferry.daemon.server.sse import EventStream

# what a decode daemon's answer may break with as it is read: the connection (aiohttp's
# errors), a read past the request's time, or a stream cut short (StreamEnded)
BROKEN = (aiohttp.ClientError, asyncio.TimeoutError)


class StreamEnded(aiohttp.ClientPayloadError):
    """A decode daemon's stream ended before its first event, or inside an event."""


# OpenAI error types a decode daemon gives a stream that failed before its first token and
# that another daemon may serve: its 502 (a transfer failed) and 503 (unavailable) kinds
RETRY_TYPES = frozenset({"server_error", "unavailable"})
TARGET_HEADER = "x-kvferry-target"  # which decode daemon answered


class Splitter:
    """Cuts a byte stream after its last complete server-sent event."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The whole events `chunk` completes (b"" if none); the rest is kept."""
        data = self.pending + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self.pending = data
            return b""
        self.pending = data[end + 2 :]
        return data[: end + 2]


def is_stream(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


async def head(response: aiohttp.ClientResponse) -> tuple[bytes, AsyncIterator[bytes]]:
    """The stream's bytes up to the end of its first data event at least (comments before it
    are kept), and the rest to come, as they arrive; StreamEnded if it ends first."""
    chunks = response.content.iter_any()
    data = b""
    async for chunk in chunks:
        data += chunk
        if _first_data(data) is not None:
            return data, chunks
    raise StreamEnded("the stream ended before its first event")


def refused(data: bytes) -> str | None:
    """Why a stream that begins with `data` failed before any token, if another daemon may
    serve it (its first data event is an error of a RETRY_TYPES kind); else None."""
    first = _first_data(data) or b""
    if b'"error"' not in first:
        return None
    try:
        error = json.loads(first[len(b"data:") :])["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or error.get("type") not in RETRY_TYPES:
        return None
    return f"its stream began with an error ({error.get('type')}: {error.get('message')})"


def _first_data(data: bytes) -> bytes | None:
    """The first complete event of `data` that carries data (not only comments), if any."""
    events = data.split(b"\n\n")
    return next((event for event in events[:-1] if event.startswith(b"data")), None)


class Relay:
    """One stream on its way to the client. It owns the upstream response from `head` on:
    `done(outcome)` runs exactly once when the stream ends, however (ok, broken, cancelled).
    A client that leaves has `close` called (the upstream response's): the read waiting on it
    ends at once, and the decode daemon sees its connection close."""

    def __init__(
        self,
        target: str,
        data: bytes,
        rest: AsyncIterator[bytes],
        first_sent: Callable[[], None],
        done: Callable[[str, str | None], Awaitable[None]],
        close: Callable[[], None],
    ) -> None:
        self.target, self.data, self.rest = target, data, rest
        self.first_sent, self.done, self.close = first_sent, done, close
        self.gone = False  # the client left

    def response(self) -> EventStream:
        return EventStream(self._events(), {TARGET_HEADER: self.target}, on_gone=self._left)

    def _left(self) -> None:
        self.gone = True
        self.close()

    async def _events(self):
        outcome, why, events = "cancelled", None, Splitter()
        try:
            yield events.feed(self.data)
            self.first_sent()
            async for chunk in self.rest:
                whole = events.feed(chunk)
                if whole:
                    yield whole
            if events.pending.strip():
                raise StreamEnded("the stream ended inside an event")
            outcome = "ok"
        except BROKEN as exc:
            if not self.gone:  # else its read ended as the client left: nobody reads on
                outcome, why = "broken", str(exc) or type(exc).__name__
                message = f"decode daemon {self.target} failed mid-stream: {why}"
                yield RouterError(502, message, "server_error", "broken").event()
        finally:
            await self.done(outcome, why)
