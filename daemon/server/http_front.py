"""The daemons' HTTP front: `POST /v1/completions` and `GET /v1/models` (decode; OpenAI's API,
with server-sent events when streaming: `completions.py`), `GET /health`, `GET /status` and
`GET /metrics` (both roles).

An ASGI app (Starlette) on uvicorn, on one event loop in one thread: connections are kept
alive, streams cost a coroutine rather than a thread, and the listening socket is the daemon's
own, bound before the ranks start, with a backlog for bursts of clients. A client gets
`http_header_timeout_s` to send each request's headers (`http_protocol.py`), and requests
beyond MAX_CONNECTIONS connections or answers at once get a 503. A handler talks to the
daemon through `generate`, `end`, `abort` and `metrics` only, and shows it as
`daemon/server/status.py` reads it.
"""

from __future__ import annotations

import functools
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvferry.daemon.server import status as shown
from kvferry.daemon.server.api_key import RequireApiKey, read_api_key
from kvferry.daemon.server.client_limit import ClientLimit
from kvferry.daemon.server.completions import HTTPError, chat_completions, completions, models
from kvferry.daemon.server.contain import ContainErrors
from kvferry.daemon.server.http_protocol import LOOP, HeaderTimeoutProtocol
from kvferry.daemon.server.metrics import CONTENT_TYPE
from kvferry.daemon.server.open_files import allow_open_files

__all__ = ["HTTPError", "HTTPFront", "start_http"]

BACKLOG = 2048  # connections the kernel holds while the loop accepts (a burst of clients)
KEEP_ALIVE_S = 5.0  # an idle kept-alive connection is closed after this long
STOP_S = 10.0  # on shutdown, how long open connections get to finish
# Past this many open connections, or answers in progress, a new request gets a 503 at once.
# Well above the thousand streams one daemon is loaded with; a connection is a file
# descriptor, and the limit on those is raised to match at start.
MAX_CONNECTIONS = 4096
SPARE_FILES = 1024  # descriptors besides the connections: ZeroMQ, pipes to the ranks, logs


class HTTPFront:
    """The front of `daemon`, serving on host:port (0: any free port) from its own thread;
    a client has `header_timeout_s` to send each request's headers."""

    def __init__(self, daemon, host: str, port: int, header_timeout_s: float) -> None:
        allow_open_files(MAX_CONNECTIONS + SPARE_FILES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.server_port = self._socket.getsockname()[1]
        own = daemon.config
        app = ClientLimit(_app(daemon), own.http_max_requests_per_client, daemon.metrics.refused)
        key = read_api_key(own.api_key_file, own.api_key_env)
        app = RequireApiKey(app, key) if key else app
        config = uvicorn.Config(
            ContainErrors(app, daemon.metrics.http_internal_errors.inc),
            log_config=None,  # the daemon's logging stays as it is
            log_level="warning",
            access_log=False,  # requests are counted in the metrics, not logged line by line
            lifespan="off",
            loop=LOOP,  # uvloop (http_protocol.py)
            http=functools.partial(HeaderTimeoutProtocol, header_timeout_s=header_timeout_s),
            timeout_keep_alive=KEEP_ALIVE_S,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_graceful_shutdown=STOP_S,
            server_header=False,
            proxy_headers=False,  # a client is its socket's peer: X-Forwarded-For names none
        )
        self._server = uvicorn.Server(config)
        # the daemon watches this thread: without it nobody can reach the daemon
        self.thread = threading.Thread(
            target=self._server.run, args=([self._socket],), name="kvferry-http", daemon=True
        )
        self.thread.start()

    def shutdown(self) -> None:
        """Stop taking connections, let open ones finish (up to STOP_S), end the thread."""
        self._server.should_exit = True
        self.thread.join(STOP_S + 5.0)
        self._socket.close()


def start_http(daemon, host: str, port: int, header_timeout_s: float) -> HTTPFront:
    return HTTPFront(daemon, host, port, header_timeout_s)


def _app(daemon) -> Starlette:
    app = Starlette(
        routes=[
            Route("/health", _health),
            Route("/status", _status),
            Route("/metrics", _metrics),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
        ],
        exception_handlers={HTTPError: _error, HTTPException: _no_route},
    )
    app.state.daemon = daemon
    return app


# --- plain answers (sync: Starlette runs them in its thread pool) ---------------------------


def _health(request: Request) -> Response:
    status, payload = shown.health(request.app.state.daemon)
    return JSONResponse(payload, status)


def _status(request: Request) -> Response:
    return JSONResponse(shown.status(request.app.state.daemon))


def _metrics(request: Request) -> Response:
    return Response(request.app.state.daemon.metrics.render(), media_type=CONTENT_TYPE)


def _error(request: Request, exc: HTTPError) -> Response:
    return JSONResponse(exc.body(), exc.status)


def _no_route(request: Request, exc: HTTPException) -> Response:
    return _error(request, HTTPError.no_route(request.method, request.url.path))
