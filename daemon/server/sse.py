"""Server-sent events for the decode daemon's streamed answers (`completions.py`): the response
that writes them, each event's bytes, and the wait for a client to leave."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from starlette.requests import Request
from starlette.responses import Response


class EventStream(Response):
    """A streamed answer: server-sent events, each chunk handed to `send` as it comes.

    Starlette's StreamingResponse runs each response in a task group beside a task that watches
    for the client leaving (uvicorn speaks ASGI 2.3, where `send` does not tell). An answer
    here watches for that itself (`disconnected`) and ends its chunks early, so this is the loop
    that writes them and nothing more: a quarter less of the front's CPU per request
    (docs/benchmarks.md, "The HTTP front's streams without a task group")."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        # as StreamingResponse: no body, so no Content-Length (uvicorn sends the chunks chunked)
        self.chunks, self.status_code, self.background = chunks, 200, None
        self.init_headers({"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def disconnected(http: Request) -> None:
    """Returns once the client has closed its connection (the body is read by then)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def event(payload: dict) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
