"""Server-sent events for the streamed answers of the decode daemons (`completions.py`) and the
routers (`daemon/router/relay.py`): the response that writes them, each event's bytes, and the
wait for a client to leave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.responses import Response


class EventStream(Response):
    """A streamed answer: server-sent events, each chunk handed to `send` as it comes.

    Starlette's StreamingResponse runs each response in a task group beside a task that watches
    for the client leaving (uvicorn speaks ASGI 2.3, where `send` does not tell), and cancels
    the chunks' generator when it does. Here the chunks end early by themselves: a decode
    daemon's answer waits on its tokens and the client's leaving together (`disconnected`), a
    router's relay is told by `on_gone` (called once, on the loop, if the client leaves before
    the last chunk) and closes what it reads from. So this is the loop that writes the chunks
    and little more: a quarter less of the front's CPU per request (docs/benchmarks.md, "The
    HTTP front's streams without a task group")."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        # as StreamingResponse: no body, so no Content-Length (uvicorn sends the chunks chunked)
        self.chunks, self.status_code, self.background = chunks, 200, None
        self.on_gone = on_gone
        self.init_headers({"Cache-Control": "no-cache", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        gone = None
        if self.on_gone is not None:
            gone = asyncio.ensure_future(disconnected(receive))
            gone.add_done_callback(self._left)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            if gone is not None:
                gone.cancel()

    def _left(self, gone: asyncio.Future) -> None:
        if not gone.cancelled() and gone.exception() is None:
            self.on_gone()


async def disconnected(receive) -> None:
    """Returns once the client has closed its connection (`receive`: its request's ASGI
    receive, the body read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def event(payload: dict) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
