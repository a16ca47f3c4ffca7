"""Completions (streamed or whole) from one daemon, many at a time on one asyncio event loop,
over one pool of kept-alive connections (aiohttp): what `kvferry bench` loads a daemon with. A
stream costs the client a coroutine and a connection, so a thousand of them in flight are a
thousand coroutines on one thread, not a thousand threads.

A load generator's own time is in every TTFT it measures: from the request's start to its
first token read, the client builds and writes the request, then reads and parses the
answer's first event. aiohttp's client does that in about a third of httpx's time, and a
streamed token costs it about a fifth of the CPU (`bench/client_overhead.py`).

Failures are the `ClientError`s of replies.py, as with the one-at-a-time client (client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import msgspec

from kvferry.daemon.cli.api_key import bearer
from kvferry.daemon.cli.client import JSON_BODY, KEEPALIVE_EXPIRY_S, base_url, tls_context
from kvferry.daemon.cli.replies import (
    ClientError,
    Completion,
    ConnectionReset,
    EventReader,
    RequestTimeout,
    ServerError,
    Tally,
    Unreachable,
    json_answer,
)
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.os_reason import os_reason


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
        self._connections = connections
        self._headers = bearer(api_key)  # the key, if the daemon asks one: never logged
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncDaemonClient:
        connector = aiohttp.TCPConnector(
            limit=self._connections,
            keepalive_timeout=KEEPALIVE_EXPIRY_S,
            ssl=tls_context() if self.url.startswith("https:") else True,
        )
        self._http = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # each request's whole deadline is its wait_for; aiohttp bounds the connecting
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            trust_env=False,  # no proxies from the environment: the daemon is reached directly
            auto_decompress=False,  # the daemons' answers are not compressed
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.close()

    async def health(self) -> int:
        """GET /health: the status code, whatever it is (raises aiohttp.ClientError or
        TimeoutError if there is no answer)."""
        deadline = aiohttp.ClientTimeout(total=self.timeout)
        async with self._http.get(self.url + "/health", timeout=deadline) as reply:
            await reply.read()
            return reply.status

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
        async with self._post(body) as reply:
            content = await reply.read()
            if reply.status >= 400:
                raise ServerError.of_status(self.url, reply.status, content)
        tally = Tally(start)
        tally.add(json_answer(self.url, content), streamed=False)
        return tally.result()

    async def _stream(self, request: CompletionRequest, start: float) -> Completion:
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=True))
        tally, reader = Tally(start), EventReader(self.url)
        async with self._post(body) as reply:
            if reply.status >= 400:
                raise ServerError.of_status(self.url, reply.status, await reply.read())
            # to the end of the body, not only to [DONE]: then the connection is reused
            rest = b""
            async for data in reply.content.iter_any():
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    event = reader.feed(line.rstrip(b"\r").decode())
                    if event is not None:
                        tally.add(event, streamed=True)
        reader.ended()  # cut short (inside an event, or between two): a ConnectionReset
        return tally.result()

    def _post(self, body: bytes):
        return self._http.post(self.url + "/v1/completions", data=body, headers=JSON_BODY)


# the connection broke under an answer: closed by the daemon, its body cut short, a reset
BROKEN = (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)


@contextlib.contextmanager
def translated(url: str, timeout: float):
    """aiohttp's failures as ClientErrors naming the URL: nothing answered (Unreachable), the
    answer stopped coming (RequestTimeout), the connection broke (ConnectionReset)."""
    try:
        yield
    except aiohttp.ClientConnectorError as exc:  # refused, unknown host, no route
        raise Unreachable(url, os_reason(exc.os_error)) from None
    except aiohttp.ConnectionTimeoutError:  # before TimeoutError, which it is too
        raise Unreachable(url, "no connection within the timeout") from None
    except (TimeoutError, asyncio.TimeoutError):  # a read, the deadline (aiohttp's too)
        raise RequestTimeout(url, f"no answer within {timeout:g} s") from None
    except BROKEN as exc:
        raise ConnectionReset(url, f"connection lost: {os_reason(exc)}") from None
    except aiohttp.ClientError as exc:
        raise ClientError(url, f"{type(exc).__name__}: {os_reason(exc)}") from None
