"""Completions (streamed or whole) from one daemon, many at a time on one asyncio event loop,
over one pool of kept-alive connections (httpx): what `kvferry bench` loads a daemon with. A stream
costs the client a coroutine and a connection, so a thousand of them in flight are a thousand
coroutines on one thread, not a thousand threads.

Failures are the `ClientError`s of replies.py, as with the one-at-a-time client (client.py).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec

from kvferry.daemon.cli.api_key import bearer
from kvferry.daemon.cli.client import JSON_BODY, KEEPALIVE_EXPIRY_S, base_url, tls_context
from kvferry.daemon.cli.replies import (
    Completion,
    EventReader,
    ServerError,
    Tally,
    json_answer,
    translated,
)
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.http_client import transport


class AsyncDaemonClient:
    """Streams completions from the daemon at `url`, up to `connections` at once (more wait
    for a connection); `timeout` bounds each whole request, waiting for a connection
    included. Use it in an `async with` block, on the loop that runs its requests."""

    def __init__(
        self, url: str, timeout: float, connections: int, api_key: str | None = None
    ) -> None:
        assert connections >= 1, connections
        self.url = base_url(url)
        self.timeout = timeout
        limits = httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self._http = httpx.AsyncClient(
            base_url=self.url,
            transport=transport(limits, verify=tls_context()),
            timeout=timeout,
            headers=bearer(api_key),  # the key, if the daemon asks one: never logged
            trust_env=False,  # no proxies from the environment: the daemon is reached directly
        )

    async def __aenter__(self) -> AsyncDaemonClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def health(self) -> int:
        """GET /health: the status code, whatever it is (raises httpx.HTTPError if there is
        no answer)."""
        return (await self._http.get("/health")).status_code

    async def stream(self, request: CompletionRequest) -> Completion:
        """One streamed completion, read to the end of its answer."""
        start = time.monotonic()
        with translated(self.url, self.timeout):
            return await asyncio.wait_for(self._stream(request, start), self.timeout)

    async def complete(self, request: CompletionRequest) -> Completion:
        """One unstreamed completion."""
        start = time.monotonic()
        with translated(self.url, self.timeout):
            return await asyncio.wait_for(self._complete(request, start), self.timeout)

    async def _complete(self, request: CompletionRequest, start: float) -> Completion:
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=False))
        reply = await self._http.post("/v1/completions", content=body, headers=JSON_BODY)
        if not reply.is_success:
            raise ServerError.of_status(self.url, reply.status_code, reply.content)
        tally = Tally(start)
        tally.add(json_answer(self.url, reply.content), streamed=False)
        return tally.result()

    async def _stream(self, request: CompletionRequest, start: float) -> Completion:
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=True))
        tally, reader = Tally(start), EventReader(self.url)
        async with self._http.stream(
            "POST", "/v1/completions", content=body, headers=JSON_BODY
        ) as reply:
            if not reply.is_success:
                raise ServerError.of_status(self.url, reply.status_code, await reply.aread())
            # to the end of the body, not only to [DONE]: then the connection is reused
            async for line in reply.aiter_lines():
                event = reader.feed(line)
                if event is not None:
                    tally.add(event, streamed=True)
        reader.ended()
        return tally.result()
