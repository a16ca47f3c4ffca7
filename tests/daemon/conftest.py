"""Fixtures shared by the daemon tests: a stub daemon over HTTP and a rendered metrics registry."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from kvferry.daemon.server.metrics import Metrics
from kvferry.daemon.server.protocol import Snapshot
from kvferry.transport.failure import Failure, FailureKind, ring_full
from support.cli_sim import STATUS, StubDaemon
from support.metrics_sim import decode_snapshots, snapshot


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubDaemon)
    server.seen, server.status = [], STATUS
    server.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def rendered() -> tuple[str, list[Snapshot]]:
    """A decode daemon's registry after two ranks' snapshots and a few finished requests."""
    metrics = Metrics("decode", "d0")
    stale = snapshot(0, bytes_received=1, kv_pages_used=500, forward_s=[0.5])
    for s in [stale, *decode_snapshots()]:
        metrics.take(s)  # a rank's later snapshot replaces its earlier one
    metrics.ttft.observe(0.2)
    metrics.itl.observe(0.004)
    metrics.latency.observe(1.5)
    metrics.transfer.observe(0.1)
    metrics.in_flight.inc(3)
    metrics.prefill_reachable.labels("tcp://127.0.0.1:17100").set(1)
    metrics.prefill_picks.labels("tcp://127.0.0.1:17100").inc(4)
    metrics.prefill_backoffs.labels("tcp://127.0.0.1:17100").inc()
    metrics.prefill_retries.inc()
    metrics.finished(None)
    metrics.finished(None)
    refused = "prefill tcp://127.0.0.1:17100 refused the prompt: not serving"
    metrics.finished(Failure(FailureKind.REFUSED, refused))
    metrics.finished(ring_full(30))
    return metrics.render().decode(), decode_snapshots()
