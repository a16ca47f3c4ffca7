"""Prometheus metrics of one router (documented in docs/fleet.md).

Counters and histograms are updated as requests go; the targets' gauges are read from the pool
at scrape time, so a retired target leaves them when it leaves the pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from kvferry.daemon.router.pool import TargetPool

disable_created_metrics()  # no `_created` series beside each counter (as in a daemon)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Outcome of one attempt on a target (kvferry_router_requests_total):
#   ok        answered 2xx (a stream: ended with its last event)
#   rejected  answered 4xx, passed to the client (the request itself is wrong)
#   error     answered another failure the router does not retry (504), passed to the client
#   failed    failed before the client got a byte: unreachable, dropped, 500/502/503
#   timeout   the request's time ran out before an answer (the target is not backed off)
#   broken    a stream that failed after its first event went to the client
#   cancelled the client left first
# Outcome of a client's request (kvferry_router_answers_total): ok, rejected, error (the
# router's own error or a decode daemon's, nothing served), broken, cancelled.


class RouterMetrics:
    def __init__(self, pool: TargetPool, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "kvferry_router_requests",
            "Attempts on decode daemons, by target and outcome",
            ["target", "outcome"],
            registry=r,
        )
        self.answers = Counter(
            "kvferry_router_answers", "Client requests, by outcome", ["outcome"], registry=r
        )
        self.http_internal_errors = Counter(
            "kvferry_http_internal_errors",
            "HTTP requests whose handling raised (each one a bug; the router kept serving)",
            registry=r,
        )
        self.retries = Counter(
            "kvferry_router_retries",
            "Attempts after a request's first (its earlier attempts failed before any byte)",
            registry=r,
        )
        self.latency = Histogram(
            "kvferry_router_request_seconds",
            "From a request's body in to its answer's end (a stream's last event)",
            buckets=_SECONDS,
            registry=r,
        )
        self.first_byte = Histogram(
            "kvferry_router_first_byte_seconds",
            "From a request's body in to its answer's first byte (a stream's first event)",
            buckets=_SECONDS,
            registry=r,
        )
        self.limit_refusals = Counter(
            "kvferry_limit_refusals",
            "Requests refused because they would pass a configured limit, by limit",
            ["limit"],
            registry=r,
        )
        for limit in ("http_max_requests_per_client", "http_max_body_bytes"):
            self.limit_refusals.labels(limit)  # a series at 0 from the start
        r.register(_Targets(pool, clock))
        ProcessCollector(registry=r)

    def refused(self, limit: str) -> None:
        self.limit_refusals.labels(limit).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Targets:
    """The pool's targets as gauges, read at scrape time."""

    def __init__(self, pool: TargetPool, clock: Callable[[], float]) -> None:
        self.pool, self.clock = pool, clock

    def collect(self):
        now = self.clock()
        up = GaugeMetricFamily(
            "kvferry_router_target_up",
            "1 while the target takes requests (healthy, not backing off, not retiring)",
            labels=["target"],
        )
        in_flight = GaugeMetricFamily(
            "kvferry_router_target_in_flight",
            "This router's requests in flight on the target",
            labels=["target"],
        )
        for target in self.pool.targets():
            up.add_metric([target.url], float(target.usable(now)))
            in_flight.add_metric([target.url], target.in_flight)
        total = GaugeMetricFamily(
            "kvferry_router_targets_up", "Targets taking requests", len(self.pool.usable(now))
        )
        yield from (up, in_flight, total)
