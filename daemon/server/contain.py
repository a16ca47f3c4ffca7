"""The outermost layer of a daemon's HTTP app: an exception that escapes a request's handling
is a bug of the daemon, whatever request set it off. It is counted
(`kvferry_http_internal_errors_total`), logged with its traceback at most once every few seconds
(a client must not be able to fill the logs by repeating the request), and answered with a 500
if no answer had begun — Starlette's own where its app sent one before re-raising, else one in
OpenAI's error shape from here — and it goes no further: uvicorn would log each one in full."""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvferry.daemon.server.client_limit import send_error
from kvferry.transport.log_limit import RateLimitedLog

log = logging.getLogger(__name__)


class ContainErrors:
    """ASGI middleware: `counted()` is called for each request whose handling raised."""

    def __init__(self, app, counted: Callable[[], None]) -> None:
        self.app, self._counted = app, counted
        self._log = RateLimitedLog(log)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            self._counted()
            where = f"{scope.get('method', '')} {scope.get('path', '')}"
            self._log.error("http", "internal error answering %s", where, exc_info=exc)
            if not started:
                why = f"internal error: {type(exc).__name__}"
                await send_error(send, 500, why, "internal", "server_error")
