"""Requests one client may have in progress at once on an HTTP front (a decode daemon's, a
router's): `/v1/...` requests are counted per client host while they are answered, streams
included; one past `http_max_requests_per_client` gets a 429 in OpenAI's error shape naming
the limit, and the refusal is counted (`kvferry_limit_refusals_total{limit=...}`). Other
clients are served as before: one client cannot take every connection slot of the front.

Keyed by the client's address, not its connection: HTTP/1.1 answers one request at a time per
connection, so a client gets concurrency by opening connections, and those share its address.
A router is one client of each decode daemon it sends to.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from kvferry.daemon.server.api_key import API_PREFIX

LIMIT = "http_max_requests_per_client"


class ClientLimit:
    """ASGI middleware: at most `limit` `/v1/...` requests in progress per client host;
    `refused(LIMIT)` is called for each one turned away."""

    def __init__(self, app, limit: int, refused: Callable[[str], None]) -> None:
        assert limit >= 1, limit
        self.app, self.limit, self._refused = app, limit, refused
        self._in_progress: dict[str, int] = {}  # client host -> requests; only the event loop

    def in_progress(self, host: str) -> int:
        return self._in_progress.get(host, 0)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("", 0))[0]
        if self.in_progress(host) >= self.limit:
            self._refused(LIMIT)
            message = f"too many requests in progress from this client: {LIMIT}={self.limit}"
            await send_error(send, 429, message, "rate_limit_exceeded")
            return
        self._in_progress[host] = self.in_progress(host) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self._in_progress[host] - 1
            if left:
                self._in_progress[host] = left
            else:
                del self._in_progress[host]  # a host with nothing in progress leaves no trace


async def send_error(
    send, status: int, message: str, code: str, kind: str = "invalid_request_error"
) -> None:
    """An ASGI answer in OpenAI's error shape (`kind`: its type)."""
    error = {"message": message, "type": kind, "code": code, "param": None}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
