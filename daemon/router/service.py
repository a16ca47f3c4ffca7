"""`Router`: what one router is made of (target pool, watcher, forwarder, metrics), and what it
shows of itself (`/health`, `/status`).

The watcher and the pooled connections to the targets live on the event loop that serves the
router's app: they start and stop with it (`lifespan`), so nothing here outlives the loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import aiohttp

from kvferry.daemon.router.forward import Call, Forwarder
from kvferry.daemon.router.metrics import RouterMetrics
from kvferry.daemon.router.pool import TargetPool
from kvferry.daemon.router.resolver import Resolver, system_resolver
from kvferry.daemon.router.watcher import Watcher
from kvferry.daemon.server.api_key import read_api_key
from kvferry.daemon.server.config import RouterConfig

MAX_UPSTREAM_CONNECTIONS = 4096  # to all targets together; one per request in flight
# Idle pooled connections are dropped before a daemon closes them (5 s), so that no request
# goes out on a connection the daemon is closing.
KEEP_ALIVE_S = 2.0


class Router:
    """One router; `resolver` says what each configured target stands for (tests pass their
    own)."""

    def __init__(self, config: RouterConfig, resolver: Resolver = system_resolver) -> None:
        self.config, self.resolver = config, resolver
        self.api_key = read_api_key(config.api_key_file, config.api_key_env)
        self.pool = TargetPool()
        self.metrics = RouterMetrics(self.pool)
        self.state = "starting"  # serving, stopping, stopped
        self.forwarder: Forwarder | None = None  # while the app runs
        self.ready = threading.Event()  # the first look at the targets is done

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        connector = aiohttp.TCPConnector(
            limit=MAX_UPSTREAM_CONNECTIONS, keepalive_timeout=KEEP_ALIVE_S
        )
        # one key for the deployment: the router shows its own to the decode daemons. Not
        # trust_env: a proxy set for the host's outgoing traffic must not sit between the router
        # and its daemons. Each request sets its own timeouts (forward.py, watcher.py).
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else None
        client = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )
        async with client:
            watcher = Watcher(self.config, self.pool, client, self.resolver)
            self.forwarder = Forwarder(self.config, self.pool, client, self.metrics, watcher.failed)
            await watcher.start()
            self.state = "serving"
            self.ready.set()
            try:
                yield
            finally:
                self.state = "stopped"
                await watcher.stop()

    def call(self, method: str, path: str, body: bytes, stream: bool) -> Call:
        now = time.monotonic()
        return Call(method, path, body, stream, now, now + self.config.request_timeout_s)

    def health(self) -> tuple[int, dict]:
        """200 while serving with a target that takes requests; 503 with the reason otherwise."""
        usable = len(self.pool.usable(time.monotonic()))
        status = self.state if self.state != "serving" else ("ok" if usable else "no_target")
        body = {"status": status, "role": "router", "name": self.config.name, "pid": os.getpid()}
        return (200 if status == "ok" else 503), {**body, "targets_up": usable}

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "role": "router",
            "name": self.config.name,
            "state": self.state,
            "configured": list(self.config.targets),
            "targets": [target.describe(now) for target in self.pool.targets()],
        }
