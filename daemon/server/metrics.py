"""Prometheus metrics of one daemon (documented in docs/metrics.md).

Rank workers report cumulative counters and gauges in their `Snapshot`s; a collector turns the
latest snapshot of each rank into metric families at scrape time. Latency samples (forward
passes, transfers) come along in the snapshots and go into histograms here, next to the
request-level histograms (TTFT, inter-token latency) the daemon observes itself. The prefill
daemon's bootstrap server keeps its own counters of what it refused; they are read at scrape time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvferry.daemon.server.heap import GCPauses
from kvferry.daemon.server.metric_families import BOOTSTRAP, COUNTERS, GAUGES, LIMITS
from kvferry.daemon.server.protocol import Snapshot
from kvferry.transport.failure import Failure

# Without this every counter and histogram also exports an `<name>_created` gauge (its creation
# time) in the text format: a second series per label set that reads like a metric of its own
# (`kvferry_requests_created`). The setting is process-wide; a daemon has no other registry.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STEP = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_GC = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self, role: str, name: str) -> None:
        self.registry = CollectorRegistry()
        self._snapshots: dict[int, Snapshot] = {}
        self._lock = threading.Lock()
        self._bootstrap: Callable[[], dict[str, int]] | None = None
        self._limits = dict.fromkeys(LIMITS, 0)  # refusals the daemon process made
        self.registry.register(_SnapshotCollector(self))
        self.registry.register(_LimitCollector(self))
        self.registry.register(_BootstrapCollector(self))
        r = self.registry
        # process_resident_memory_bytes, process_open_fds, …: the daemon's own process, which
        # holds the HTTP connections (the ranks are processes of their own)
        ProcessCollector(registry=r)
        Gauge("kvferry_info", "The daemon", ["role", "name"], registry=r).labels(role, name).set(1)
        self.forward = Histogram(
            "kvferry_forward_seconds", "Host time of one forward pass", buckets=_STEP, registry=r
        )
        self.transfer = Histogram(
            "kvferry_transfer_seconds",
            "KV transfer of one request: decode, page reservation to KV on every rank; "
            "prefill, last chunk computed to delivered",
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "kvferry_ttft_seconds", "Time to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "kvferry_inter_token_seconds",
            "Time between consecutive tokens of a request",
            buckets=_STEP,
            registry=r,
        )
        self.latency = Histogram(
            "kvferry_request_seconds", "Request end to end", buckets=_LATENCY, registry=r
        )
        self.requests = Counter(
            "kvferry_requests", "Requests finished, by outcome", ["outcome"], registry=r
        )
        self.failures = Counter(
            "kvferry_request_failures", "Failed requests, by kind", ["kind"], registry=r
        )
        self.gc_pause = Histogram(
            "kvferry_gc_pause_seconds",
            "Garbage collector passes (every thread of the process waits), by process (daemon, "
            "rank0, ...) and generation (2: a full pass)",
            ["process", "generation"],
            buckets=_GC,
            registry=r,
        )
        self.gc = GCPauses()  # the daemon process's own passes (timed once it serves)
        self.in_flight = Gauge("kvferry_requests_in_flight", "Requests in flight", registry=r)
        self.http_internal_errors = Counter(
            "kvferry_http_internal_errors",
            "HTTP requests whose handling raised (each one a bug; the front kept serving)",
            registry=r,
        )
        self.prefill_reachable = Gauge(
            "kvferry_prefill_reachable",
            "Decode: 1 when the prefill daemon's bootstrap server answered the last probe",
            ["prefill"],
            registry=r,
        )
        self.prefill_picks = Counter(
            "kvferry_prefill_picks",
            "Decode: requests handed to each prefill daemon (the least loaded usable one)",
            ["prefill"],
            registry=r,
        )
        self.prefill_backoffs = Counter(
            "kvferry_prefill_backoffs",
            "Decode: hand-offs a prefill daemon failed (it then gets no request for a while)",
            ["prefill"],
            registry=r,
        )

        self.prefill_retries = Counter(
            "kvferry_prefill_retries",
            "Decode: requests resubmitted to another prefill after a failure before any KV",
            registry=r,
        )

    def forget_prefill(self, address: str) -> None:
        """A prefill daemon left the deployment (its name no longer stands for it)."""
        for metric in (self.prefill_reachable, self.prefill_picks, self.prefill_backoffs):
            with contextlib.suppress(KeyError):
                metric.remove(address)

    def take(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots[snapshot.rank] = snapshot
        for seconds in snapshot.forward_s:
            self.forward.observe(seconds)
        for seconds in snapshot.transfer_s:
            self.transfer.observe(seconds)
        self._observe_gc(f"rank{snapshot.rank}", snapshot.gc_pauses)
        self._observe_gc("daemon", self.gc.take())

    def _observe_gc(self, process: str, pauses: list[tuple[int, float]]) -> None:
        for generation, seconds in pauses:
            self.gc_pause.labels(process, str(generation)).observe(seconds)

    def count_bootstrap(self, counters: Callable[[], dict[str, int]]) -> None:
        """Export the bootstrap server's counters (`BootstrapServer.counters`), read at scrape
        time; without one (decode, or before it starts) they stay at 0."""
        self._bootstrap = counters

    def bootstrap_counters(self) -> dict[str, int]:
        return self._bootstrap() if self._bootstrap is not None else {}

    def refused(self, limit: str) -> None:
        """Count a request or frame turned away by `limit` (one of LIMITS); any thread."""
        with self._lock:
            self._limits[limit] += 1

    def limit_refusals(self) -> dict[str, int]:
        """Refusals by limit: the daemon's own and its ranks' (their latest snapshots)."""
        with self._lock:
            counts = dict(self._limits)
            for snapshot in self._snapshots.values():
                for limit, count in snapshot.limit_refusals.items():
                    counts[limit] = counts.get(limit, 0) + count
        counts["max_frame_bytes"] += self.bootstrap_counters().get("oversized_frames", 0)
        return counts

    def finished(self, failure: Failure | None) -> None:
        """A request or prompt ended: ok (`failure` None), or with an error of failure's kind."""
        self.requests.labels("ok" if failure is None else "error").inc()
        if failure is not None:
            self.failures.labels(failure.kind.value).inc()

    def snapshots(self) -> list[Snapshot]:
        with self._lock:
            return [self._snapshots[r] for r in sorted(self._snapshots)]

    def render(self) -> bytes:
        self._observe_gc("daemon", self.gc.take())
        return generate_latest(self.registry)


class _SnapshotCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        snapshots = self.metrics.snapshots()
        for name, text, attr in COUNTERS:
            family = CounterMetricFamily(name, text, labels=["rank"])
            for s in snapshots:
                family.add_metric([str(s.rank)], getattr(s, attr))
            yield family
        for name, text, attr in GAUGES:
            family = GaugeMetricFamily(name, text, labels=["rank"])
            for s in snapshots:
                family.add_metric([str(s.rank)], getattr(s, attr))
            yield family
        failures = CounterMetricFamily(
            "kvferry_transfer_failures", "Failed transfers, by kind", labels=["rank", "kind"]
        )
        rooms = GaugeMetricFamily(
            "kvferry_rooms", "Transfer rooms by state", labels=["rank", "state"]
        )
        queues = GaugeMetricFamily(
            "kvferry_queue_depth", "Requests by stage on each rank", labels=["rank", "queue"]
        )
        wakes = CounterMetricFamily(
            "kvferry_transfer_loop_wakes",
            "Transfer loop turns by what woke them (a turn counts once under each cause)",
            labels=["rank", "cause"],
        )
        for s in snapshots:
            for cause, count in s.loop_wakes.items():
                wakes.add_metric([str(s.rank), cause], count)
            for kind, count in s.failures.items():
                failures.add_metric([str(s.rank), kind], count)
            for state, count in s.rooms.items():
                rooms.add_metric([str(s.rank), state], count)
            for queue, count in s.queues.items():
                queues.add_metric([str(s.rank), queue], count)
        yield from (failures, rooms, queues, wakes)


class _BootstrapCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        counters = self.metrics.bootstrap_counters()
        for name, text, key in BOOTSTRAP:
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))


class _LimitCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        family = CounterMetricFamily(
            "kvferry_limit_refusals",
            "Requests and frames refused because they would pass a configured limit, by limit",
            labels=["limit"],
        )
        for limit, count in sorted(self.metrics.limit_refusals().items()):
            family.add_metric([limit], count)
        yield family
