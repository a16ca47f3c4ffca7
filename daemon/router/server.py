"""Runs a router: its app on uvicorn, one event loop in one thread, on a listening socket bound
here (backlog for bursts of clients); `serve` is `kvferry router` until SIGTERM or Ctrl-C.

The HTTP details follow the decode daemon's front (`daemon/server/http_front.py`): a client gets
`http_header_timeout_s` for each request's headers, idle connections are closed after 5 s, and
past MAX_CONNECTIONS a new request gets a 503. At stop, /health answers 503 at once, the socket
stops taking connections, and requests in flight get `drain_timeout_s` to finish.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading

import uvicorn

from kvferry.daemon.router.app import build_app
from kvferry.daemon.router.resolver import Resolver, system_resolver
from kvferry.daemon.router.service import MAX_UPSTREAM_CONNECTIONS, Router
from kvferry.daemon.server.api_key import RequireApiKey
from kvferry.daemon.server.client_limit import ClientLimit
from kvferry.daemon.server.config import RouterConfig
from kvferry.daemon.server.contain import ContainErrors
from kvferry.daemon.server.http_protocol import LOOP, HeaderTimeoutProtocol
from kvferry.daemon.server.open_files import allow_open_files

log = logging.getLogger(__name__)

BACKLOG = 2048
KEEP_ALIVE_S = 5.0
MAX_CONNECTIONS = 4096  # clients' connections or answers at once
SPARE_FILES = 256  # descriptors besides client and upstream connections
START_S = 60.0  # the first look at the targets (resolution and probes, each with a timeout)
WATCH_S = 1.0  # how often `serve` checks that the server thread is alive
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class RouterStartError(RuntimeError):
    """The router did not come up; the message says what it was doing."""


class RouterServer:
    """A router on config.host:config.http_port (0: any free port), served from its own
    thread once `start` returns."""

    def __init__(self, config: RouterConfig, resolver: Resolver = system_resolver) -> None:
        allow_open_files(MAX_CONNECTIONS + MAX_UPSTREAM_CONNECTIONS + SPARE_FILES)
        self.config = config
        self.router = Router(config, resolver)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.create_server(
            (config.host, config.http_port), family=family, backlog=BACKLOG
        )
        self.port = self._socket.getsockname()[1]
        protocol = functools.partial(
            HeaderTimeoutProtocol, header_timeout_s=config.http_header_timeout_s
        )
        self._server = uvicorn.Server(
            uvicorn.Config(
                ContainErrors(
                    _guarded(self._limited(build_app(self.router)), self.router.api_key),
                    self.router.metrics.http_internal_errors.inc,
                ),
                log_config=None,  # the process's logging stays as it is
                log_level="warning",
                access_log=False,  # requests are counted in the metrics
                lifespan="on",  # the watcher and the upstream connections live in it
                loop=LOOP,  # uvloop (http_protocol.py)
                http=protocol,
                timeout_keep_alive=KEEP_ALIVE_S,
                limit_concurrency=MAX_CONNECTIONS,
                timeout_graceful_shutdown=config.drain_timeout_s,
                server_header=False,
                proxy_headers=False,  # a client is its socket's peer: X-Forwarded-For names none
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, args=([self._socket],), name="kvferry-router", daemon=True
        )

    def _limited(self, app) -> ClientLimit:
        limit = self.config.http_max_requests_per_client
        return ClientLimit(app, limit, self.router.metrics.refused)

    @property
    def url(self) -> str:
        host = _LOOPBACK.get(self.config.host, self.config.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, timeout_s: float = START_S) -> None:
        """Serve from now on; RouterStartError if the first look at the targets is not done
        within `timeout_s` or the server stops first."""
        self._thread.start()
        if not self.router.ready.wait(timeout_s) or not self.alive:
            self.stop()
            raise RouterStartError(
                f"router {self.config.name or self.url} did not start within {timeout_s:g} s"
            )

    def stop(self) -> None:
        """/health says stopping; open requests get drain_timeout_s; then the thread ends."""
        if self.router.state == "serving":
            self.router.state = "stopping"
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self.config.drain_timeout_s + 10.0)
        self._socket.close()


def serve(config: RouterConfig) -> int:
    """`kvferry router`: serve until SIGTERM or SIGINT (0), or until the server fails (1)."""
    # Blocked before any thread starts, so every thread inherits the mask and the signals
    # wait for sigtimedwait below: no handler runs in the middle of other code.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    server = RouterServer(config)
    try:
        server.start()
    except RouterStartError as exc:
        log.error("%s", exc)
        return 1
    log.info("serving on %s in front of %s", server.url, ", ".join(config.targets))
    while signal.sigtimedwait(_STOP_SIGNALS, WATCH_S) is None:
        if not server.alive:
            log.error("the HTTP server stopped on its own")
            return 1
    log.info("stopping: requests in flight get up to %g s", config.drain_timeout_s)
    server.stop()
    return 0


def _guarded(app, key: str | None):
    return RequireApiKey(app, key) if key else app
