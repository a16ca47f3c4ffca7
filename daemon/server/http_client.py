"""The transport of the HTTP client the router runs on uvloop toward its decode daemons:
httpx's own, with one failure told as what it is.

A connection its peer closes as it opens (a daemon killed while the client connects) leaves
uvloop's transport without a socket, and anyio, reading the socket's peer name as the
connection is set up, raises AttributeError from inside httpx instead of a connection error.
Nothing was sent on it: `ConnectionSafeTransport` raises httpx.ConnectError, which callers
already treat as an unreachable peer (the router tries another daemon)."""

from __future__ import annotations

import httpx


class ConnectionSafeTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._inner.handle_async_request(request)
        except AttributeError as exc:
            raise httpx.ConnectError(f"closed as it opened ({exc})", request=request) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


def transport(limits: httpx.Limits, **options) -> ConnectionSafeTransport:
    """httpx's transport with `limits` (and `verify`, ... in `options`), made safe."""
    return ConnectionSafeTransport(httpx.AsyncHTTPTransport(limits=limits, **options))
