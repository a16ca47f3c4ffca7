"""Keeps the router's pool current, on the router's event loop.

Each turn reads every target's GET /health and, when it answers 200, GET /status (its load);
a target that is unreachable or answers 503 (starting, stopping, failed, no prefill) is out
until it answers 200 again. Every `resolve_interval_s`, and soon after a request failed, each
configured target is resolved again: new addresses join the pool, vanished ones retire.

A turn comes every `poll_interval_s`, or at once after a failure (at most one turn per
MIN_TURN_GAP_S); between turns the task sleeps on an event, with the interval as its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import msgspec

from kvferry.daemon.router.pool import TargetPool
from kvferry.daemon.router.resolver import Resolver, canonical
from kvferry.daemon.router.targets import Load, Target
from kvferry.daemon.server.config import RouterConfig

log = logging.getLogger(__name__)

MIN_TURN_GAP_S = 0.2  # failures in a burst wake the watcher once, not once each
STOP_S = 5.0  # how long stop() waits for a turn in progress to end


class Watcher:
    def __init__(
        self,
        config: RouterConfig,
        pool: TargetPool,
        client: aiohttp.ClientSession,
        resolver: Resolver,
    ) -> None:
        self.config, self.pool, self.client, self.resolver = config, pool, client, resolver
        self._wake = asyncio.Event()
        self._resolve_wanted = True
        self._resolved_at = -float("inf")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """One turn now (the pool is known before the first request), then the loop."""
        await self.turn()
        self._task = asyncio.create_task(self._run(), name="kvferry-router-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_S)

    def failed(self) -> None:
        """A request failed on a target: look names up again and read every target soon."""
        self._resolve_wanted = True
        self._wake.set()

    async def turn(self) -> None:
        now = time.monotonic()
        if self._resolve_wanted or now - self._resolved_at >= self.config.resolve_interval_s:
            self._resolve_wanted, self._resolved_at = False, now
            await asyncio.gather(*(self._resolve(url) for url in self.config.targets))
        await asyncio.gather(*(self._probe(target) for target in self.pool.targets()))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)
            self._wake.clear()
            try:
                await self.turn()
            except Exception:  # a bug here must not end the watching: log it, go on
                log.exception("router watcher turn failed")
            await asyncio.sleep(MIN_TURN_GAP_S)

    async def _resolve(self, origin: str) -> None:
        try:
            urls = sorted({canonical(url) for url in await self.resolver(origin)})
        except OSError as exc:
            # keep what it stood for: a lookup that fails once says nothing of the daemons,
            # and their /health says whether they still serve
            log.warning("cannot resolve %s: %s", origin, exc)
            return
        added, retiring = self.pool.update(origin, urls)
        for url in added:
            log.info("target %s joins (from %s)", url, origin)
        for url in retiring:
            log.info("target %s retires (%s no longer stands for it)", url, origin)

    async def _probe(self, target: Target) -> None:
        try:
            status, health = await self._get(f"{target.url}/health")
            if status != 200:
                return self._down(target, _reason(status, health))
            status, body = await self._get(f"{target.url}/status")
            if status != 200:
                return self._down(target, f"/status answered {status}")
            load = Load.of_status(msgspec.json.decode(body), target.in_flight)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._resolve_wanted = True  # its address may have moved
            return self._down(target, f"unreachable: {_describe(exc)}")
        except (msgspec.DecodeError, ValueError) as exc:  # not JSON, or not a decode /status
            return self._down(target, f"bad /status: {exc}")
        if target.observed(load):
            log.info("target %s is up", target.url)

    async def _get(self, url: str) -> tuple[int, bytes]:
        """GET `url`: its status and body, read whole within `probe_timeout_s`."""
        timeout = aiohttp.ClientTimeout(total=self.config.probe_timeout_s)
        async with self.client.get(url, timeout=timeout) as response:
            return response.status, await response.read()

    def _down(self, target: Target, why: str) -> None:
        if target.down(why):
            log.warning("target %s is out: %s", target.url, why)


def _reason(status: int, health: bytes) -> str:
    """A daemon's /health says why it cannot serve in `status` (starting, stopping…)."""
    try:
        return str(msgspec.json.decode(health)["status"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return f"/health answered {status}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
