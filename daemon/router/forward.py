"""Sends a client's request to decode daemons until one answers: steps 2–6 of the router's life
of a request (`kvferry.daemon.router`).

An attempt fails (and the next target is tried) only while nothing has gone to the client:
no connection, a connection lost before the answer, a 500/502/503, or a stream whose first
event is such an error. A whole answer is read in full first, a stream up to its first event
(`relay.py`). The attempts are bounded by `attempts` and the request's deadline; a failed
target backs off and the watcher is told.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import msgspec
from starlette.responses import Response

from kvferry.daemon.router import relay
from kvferry.daemon.router.errors import AttemptFailure, AttemptKind, RouterError
from kvferry.daemon.router.metrics import RouterMetrics
from kvferry.daemon.router.pool import TargetPool
from kvferry.daemon.router.targets import Target
from kvferry.daemon.server.config import RouterConfig
from kvferry.daemon.server.os_reason import os_reason

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({500, 502, 503})
# no connection: refused, reset or timed out as it opened, or no pooled connection in time
_UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_Result = Response | relay.Relay | AttemptFailure  # of one attempt


@dataclass(frozen=True)
class Call:
    """One client request as the router carries it."""

    method: str
    path: str
    body: bytes
    stream: bool  # the body asks for a stream: read up to its first event before answering
    started: float  # time.monotonic() when its body was in
    deadline: float  # time.monotonic() by which it must be answered


class Forwarder:
    def __init__(
        self,
        config: RouterConfig,
        pool: TargetPool,
        client: aiohttp.ClientSession,
        metrics: RouterMetrics,
        on_failure: Callable[[], None],
    ) -> None:
        self.config, self.pool, self.client, self.metrics = config, pool, client, metrics
        self.on_failure = on_failure

    async def forward(self, call: Call) -> Response:
        """A decode daemon's answer, or RouterError naming every attempt."""
        try:
            response = await self._attempts(call)
        except RouterError:
            self._answered(call, "error")
            raise
        except asyncio.CancelledError:  # the client left
            self._answered(call, "cancelled")
            raise
        if isinstance(response, relay.Relay):
            return response.response()  # answered at the stream's end
        self._answered(call, _outcome(response.status_code))
        return response

    async def _attempts(self, call: Call) -> Response | relay.Relay:
        failures: list[AttemptFailure] = []
        tried: set[str] = set()
        while len(failures) < self.config.attempts and time.monotonic() < call.deadline:
            target = self.pool.pick(time.monotonic(), tried)
            if target is None:
                raise self._give_up(call, failures, tried, none_left=True)
            tried.add(target.url)
            if failures:
                self.metrics.retries.inc()
            result = await self._attempt(target, call)
            if not isinstance(result, AttemptFailure):
                return result
            failures.append(result)
            if not result.retryable:
                break
        raise self._give_up(call, failures, tried, none_left=False)

    def _give_up(
        self, call: Call, failures: list[AttemptFailure], tried: set[str], none_left: bool
    ) -> RouterError:
        now = time.monotonic()
        if not failures:
            return RouterError.no_target(self.pool.why_none(now, tried))
        timed_out = failures[-1].kind is AttemptKind.TIMEOUT or now >= call.deadline
        left = self.pool.why_none(now, tried) if none_left else None
        return RouterError.attempts_failed(failures, timed_out, left)

    async def _attempt(self, target: Target, call: Call) -> _Result:
        """One attempt; the target stays counted in flight while a Relay streams from it."""
        try:
            result = await self._exchange(target, call)
        except BaseException as exc:  # cancelled (the client left), or a bug
            self._attempt_done(target, _outcome_of(exc))
            raise
        if isinstance(result, AttemptFailure) and result.retryable:
            self._attempt_done(target, "failed")
            self._failed(target, result.detail)
        elif isinstance(result, AttemptFailure):  # the request's time ran out, not the target
            self._attempt_done(target, "timeout")
        elif isinstance(result, Response):
            self._attempt_done(target, _outcome(result.status_code))
        return result

    async def _exchange(self, target: Target, call: Call) -> _Result:
        try:
            response = await self._send(target, call)
        except relay.BROKEN as exc:
            return _failure(target.url, exc)
        result = None
        try:
            result = await self._read(target, call, response)
            return result
        except relay.BROKEN as exc:
            return _failure(target.url, exc)
        finally:
            if not isinstance(result, relay.Relay):
                response.release()

    async def _send(self, target: Target, call: Call) -> aiohttp.ClientResponse:
        """The answer's head; its body is read as it comes. The request's remaining time
        bounds the wait for a connection and each read, the connect timeout each connect."""
        remaining = max(call.deadline - time.monotonic(), 0.001)
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=remaining,
            sock_connect=min(self.config.connect_timeout_s, remaining),
            sock_read=remaining,
        )
        headers = {"content-type": "application/json"} if call.body else {}
        url, body = target.url + call.path, call.body or None
        return await self.client.request(
            call.method, url, data=body, headers=headers, timeout=timeout
        )

    async def _read(self, target: Target, call: Call, response: aiohttp.ClientResponse):
        status = response.status
        if status in RETRY_STATUSES:
            detail = f"answered {status} ({_message(await response.read())})"
            return AttemptFailure(target.url, AttemptKind.REFUSED, detail)
        if call.stream and status == 200 and relay.is_stream(response):
            data, rest = await relay.head(response)
            why = relay.refused(data)
            if why is not None:
                return AttemptFailure(target.url, AttemptKind.REFUSED, why)
            first_sent = functools.partial(self._first_sent, call)
            done = functools.partial(self._stream_done, target, call, response)
            return relay.Relay(target.url, data, rest, first_sent, done, response.close)
        body = await response.read()
        media = response.headers.get("content-type")
        headers = {relay.TARGET_HEADER: target.url}
        return Response(body, status, headers=headers, media_type=media)

    def _attempt_done(self, target: Target, outcome: str) -> None:
        self.pool.release(target)
        self.metrics.attempts.labels(target.url, outcome).inc()

    def _failed(self, target: Target, why: str) -> None:
        now = time.monotonic()
        if now >= target.backoff_until:
            log.warning(
                "target %s failed a request, backing off %g s: %s",
                target.url,
                self.config.backoff_s,
                why,
            )
        target.failed(now, self.config.backoff_s, why)
        self.on_failure()

    def _first_sent(self, call: Call) -> None:
        self.metrics.first_byte.observe(time.monotonic() - call.started)

    async def _stream_done(
        self,
        target: Target,
        call: Call,
        response: aiohttp.ClientResponse,
        outcome: str,
        why: str | None,
    ) -> None:
        response.release()  # its connection back to the pool, or closed if the stream broke off
        self._attempt_done(target, outcome)
        if outcome == "broken":
            self._failed(target, f"stream broken: {why}")
        self._answered(call, outcome, first_byte=False)

    def _answered(self, call: Call, outcome: str, first_byte: bool = True) -> None:
        elapsed = time.monotonic() - call.started
        self.metrics.answers.labels(outcome).inc()
        self.metrics.latency.observe(elapsed)
        if first_byte:
            self.metrics.first_byte.observe(elapsed)


def _failure(url: str, exc: BaseException) -> AttemptFailure:
    if isinstance(exc, _UNREACHABLE):
        kind = AttemptKind.UNREACHABLE
    elif isinstance(exc, asyncio.TimeoutError):
        kind = AttemptKind.TIMEOUT
    else:
        kind = AttemptKind.DROPPED
    why = os_reason(exc.os_error) if isinstance(exc, aiohttp.ClientConnectorError) else None
    return AttemptFailure(url, kind, f"{kind.value} ({why or str(exc) or type(exc).__name__})")


def _message(body: bytes) -> str:
    """An error answer's message (OpenAI's shape), or the start of its body."""
    try:
        return str(msgspec.json.decode(body)["error"]["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or "no body"


def _outcome_of(exc: BaseException) -> str:
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return "rejected" if status < 500 else "error"
