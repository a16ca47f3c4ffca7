"""`kvferry bench`: a load generator against a decode daemon, sweeping concurrency or request rate.

Each point sends its warm-up requests, scrapes the daemons' metrics, sends its measured requests
(streamed, greedy), and scrapes again: latencies come from the client, transfer figures from the
daemons' own counters, so they count what crossed the data plane.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import msgspec
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.report import Counters, Point, RequestRecord, point_name, summarize
from kvferry.daemon.cli.bench.senders import (
    CLIENT_CONCURRENCY,
    ClientProcesses,
    client_processes,
    send,
)
from kvferry.daemon.cli.bench.workload import (
    BenchError,
    Prompt,
    dataset_prompts,
    load_sharegpt,
    poisson_schedule,
    random_prompts,
)
from kvferry.daemon.cli.client import DaemonClient
from kvferry.daemon.cli.launcher import Launcher
from kvferry.daemon.server.api_key import read_api_key
from kvferry.daemon.server.open_files import allow_open_files

SNAPSHOT_PERIOD_S = 0.6  # ranks send their counters twice a second; wait this long to see them
BYTE_VOCAB = 256  # the byte tokenizer's byte ids, without BOS/EOS


class BenchSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to send; exactly one of `concurrency` and `request_rate` lists the points."""

    concurrency: tuple[int, ...] = ()
    request_rate: tuple[float, ...] = ()  # requests/s, Poisson arrivals
    max_concurrency: int = 256  # in-flight cap of a request-rate point
    num_requests: int = 64  # measured, per point
    warmup: int = 4  # per point, before the measured requests and the first scrape
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.5  # lengths uniform in [len * ratio, len]
    vocab: int | None = None  # prompt ids in [0, vocab); None: from the deployment, else 256
    dataset: str | None = None  # ShareGPT-style JSON instead of random ids
    seed: int = 0
    timeout_s: float = 300.0  # one request, whole
    label: str | None = None
    idle_s: float = 5.0  # before the first point: the ranks' CPU while nothing is asked of them

    def __post_init__(self) -> None:
        if bool(self.concurrency) == bool(self.request_rate):
            raise BenchError("give exactly one of concurrency and request_rate")
        if min((*self.concurrency, *self.request_rate)) <= 0:
            raise BenchError(f"points must be > 0: {self.concurrency or self.request_rate}")
        if not 0 <= self.range_ratio <= 1:
            raise BenchError(f"range_ratio={self.range_ratio} must be within [0, 1]")
        for name in ("max_concurrency", "num_requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0 or (self.vocab is not None and self.vocab < 1):
            raise BenchError(f"warmup={self.warmup} must be >= 0, vocab={self.vocab} >= 1")

    @property
    def mode(self) -> str:
        return "concurrency" if self.concurrency else "request_rate"

    @property
    def points(self) -> tuple[float, ...]:
        return self.concurrency or self.request_rate

    @property
    def connections(self) -> int:
        """The most requests any point has in flight: the client's pool of connections."""
        return int(max(self.concurrency)) if self.concurrency else self.max_concurrency


class Result(msgspec.Struct, kw_only=True):
    """Everything a run measured, as written by --out."""

    label: str | None
    created: str  # ISO 8601, UTC
    url: str  # the decode daemon requests went to
    metrics_urls: list[str]  # the daemons scraped
    deployment: str | None  # the file of a deployment the run started itself
    config: BenchSpec
    points: list[Point]
    # CPU seconds per minute the ranks (transfer and engine threads) used while idle, by role
    idle_cpu_s_per_min: dict[str, float] = msgspec.field(default_factory=dict)


_SUMS = {
    "kvferry_kv_bytes_received": "kv_bytes",
    "kvferry_ucx_messages_received": "messages",
    "kvferry_receives_posted_ahead": "receives_ahead",
}
_BY_ROLE = {
    "kvferry_transfer_cpu_seconds": "transfer_cpu_s",
    "kvferry_engine_cpu_seconds": "engine_cpu_s",
    "kvferry_transfer_rooms": "transfer_rooms",
    "kvferry_transfer_loop_turns": "loop_turns",
    "kvferry_transfer_loop_timer_turns": "loop_timer_turns",
    "kvferry_transfer_loop_quiet_turns": "loop_quiet_turns",
    "kvferry_transfer_wait_cpu_seconds": "wait_cpu_s",
    "kvferry_transfer_ucx_cpu_seconds": "ucx_cpu_s",
    "kvferry_ring_waits": "ring_waits",
    "kvferry_ring_wait_seconds": "ring_wait_s",
}
_MAXIMA = {
    "kvferry_ring_high_water_bytes": "ring_high_water_bytes",
    "kvferry_device_memory_peak_bytes": "memory_peak_bytes",
    "kvferry_kv_pool_bytes": "kv_pool_bytes",
    "kvferry_ring_capacity_bytes": "ring_capacity_bytes",
}


def scrape(urls: Sequence[str], timeout: float = 10.0, settle: bool = True) -> Counters:
    """The counters of the daemons at `urls`, summed over daemons and ranks (by role for the
    transfer CPU time and rooms; byte gauges: the largest of any rank). `settle` waits one
    snapshot period first, so that the ranks' counters include what just finished."""
    if settle:
        time.sleep(SNAPSHOT_PERIOD_S)
    sums, maxima, failures = (
        dict.fromkeys(_SUMS.values(), 0.0),
        dict.fromkeys(_MAXIMA.values(), 0.0),
        Counter(),
    )
    by_role = {name: Counter() for name in _BY_ROLE.values()}
    rss: dict[str, float] = {}
    gc_s, gc_full = Counter(), Counter()
    for url in urls:
        with DaemonClient(url, timeout) as client:
            families = list(text_string_to_metric_families(client.metrics()))
        info = next((s.labels for f in families if f.name == "kvferry_info" for s in f.samples), {})
        role = info.get("role", "?")
        for family in families:
            totals = [s for s in family.samples if s.name.endswith("_total")]
            if family.name in _SUMS:
                sums[_SUMS[family.name]] += sum(s.value for s in totals)
            elif family.name in _BY_ROLE:
                by_role[_BY_ROLE[family.name]][role] += sum(s.value for s in totals)
            elif family.name == "kvferry_transfer_failures":
                for sample in totals:
                    failures[sample.labels.get("kind", "?")] += sample.value
            elif family.name in _MAXIMA:
                key = _MAXIMA[family.name]
                maxima[key] = max([maxima[key], *(s.value for s in family.samples)])
            elif family.name == "process_resident_memory_bytes" and family.samples:
                rss[info.get("name") or url] = family.samples[0].value
            elif family.name == "kvferry_gc_pause_seconds":
                for sample in family.samples:
                    where = f"{info.get('name') or url} {sample.labels.get('process', '?')}"
                    if sample.name.endswith("_sum"):
                        gc_s[where] += sample.value
                    elif sample.name.endswith("_count") and sample.labels.get("generation") == "2":
                        gc_full[where] += sample.value
    return Counters(
        **sums,
        **maxima,
        transfer_failures=dict(failures),
        **{name: dict(values) for name, values in by_role.items()},
        rss_bytes=rss,
        gc_pause_s=dict(gc_s),
        gc_full_passes=dict(gc_full),
    )


def run_bench(
    spec: BenchSpec,
    url: str,
    metrics_urls: Sequence[str],
    out: TextIO | None = None,
    deployment: str | None = None,
    api_key: str | None = None,
) -> Result:
    """Every point of `spec` against the decode daemon at `url`, presenting `api_key` (kept
    out of the result); progress goes to `out` (default stderr)."""
    spec = msgspec.structs.replace(spec, vocab=spec.vocab or BYTE_VOCAB)
    entries = load_sharegpt(spec.dataset, spec.output_len) if spec.dataset else None
    metrics_urls = list(dict.fromkeys([url, *metrics_urls]))
    allow_open_files(spec.connections + 64)  # a socket per stream, and a few for the rest
    idle = idle_cpu(metrics_urls, spec.idle_s) if spec.idle_s > 0 else {}
    points = uvloop.run(_points(spec, url, metrics_urls, entries, out or sys.stderr, api_key))
    return Result(
        label=spec.label,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        url=url,
        metrics_urls=metrics_urls,
        deployment=deployment,
        config=spec,
        points=points,
        idle_cpu_s_per_min=idle,
    )


def idle_cpu(metrics_urls: Sequence[str], seconds: float) -> dict[str, float]:
    """CPU seconds per minute the daemons' ranks (transfer and engine threads) use over
    `seconds` in which nothing is asked of them, by role."""
    before = scrape(metrics_urls)
    time.sleep(seconds)
    moved = scrape(metrics_urls).since(before)
    roles = moved.transfer_cpu_s.keys() | moved.engine_cpu_s.keys()
    used = {r: moved.transfer_cpu_s.get(r, 0.0) + moved.engine_cpu_s.get(r, 0.0) for r in roles}
    return {role: cpu * 60 / seconds for role, cpu in used.items()}


def run_deployment(
    spec: BenchSpec,
    config_path: str,
    metrics_urls: Sequence[str] = (),
    out: TextIO | None = None,
    log: Callable[[str], None] | None = None,
    start_timeout: float = 300.0,
    api_key: str | None = None,
) -> tuple[Result, dict[str, int | None]]:
    """Starts the deployment in `config_path`, runs `spec` against its first decode daemon
    (scraping every daemon), stops it; the result and each daemon's exit code. `api_key`:
    what to present, else the key the decode daemon's config names."""
    with Launcher.from_file(config_path, log=log) as launcher:
        launcher.start(start_timeout)
        decode = next((c for c in launcher.children if c.role == "decode"), None)
        if decode is None:
            raise BenchError(f"{config_path} lists no decode daemon")
        vocab = spec.vocab or decode.daemon.model.model_config().vocab_size
        spec = msgspec.structs.replace(spec, vocab=vocab)
        urls = [child.url for child in launcher.children] + list(metrics_urls)
        api_key = api_key or read_api_key(decode.daemon.api_key_file, decode.daemon.api_key_env)
        result = run_bench(spec, decode.url, urls, out, config_path, api_key)
        return result, launcher.stop()


def write_result(result: Result, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=1) + b"\n")


def _prompts(spec: BenchSpec, rng: random.Random, entries: list[Prompt] | None) -> list[Prompt]:
    """The warm-up prompts, then the measured ones."""
    count = spec.warmup + spec.num_requests
    if entries is not None:
        return dataset_prompts(rng, entries, count)
    assert spec.vocab is not None
    return random_prompts(rng, count, spec.input_len, spec.output_len, spec.range_ratio, spec.vocab)


async def _points(spec, url, metrics_urls, entries, out: TextIO, api_key) -> list[Point]:
    """Every point, on this one event loop, through one pool of kept-alive connections."""
    rng = random.Random(spec.seed)
    points = []
    count = client_processes(spec.connections)
    spread = ClientProcesses(count, url, spec.timeout_s, api_key) if count > 1 else None
    try:
        async with AsyncDaemonClient(url, spec.timeout_s, spec.connections, api_key) as client:
            for index, value in enumerate(spec.points):
                prompts = _prompts(spec, rng, entries)
                title = f"point {index + 1}/{len(spec.points)} {point_name(spec.mode, value)}"
                progress = Progress(out, title, spec.num_requests)
                point = _point(spec, client, spread, metrics_urls, value, prompts, rng, progress)
                points.append(await point)
    finally:
        if spread is not None:
            spread.close()
    return points


async def _point(spec, client, spread, metrics_urls, value, prompts, rng, progress) -> Point:
    """One point: its warm-up from this process, then its measured requests, from the client
    processes (`spread`) where it has more than CLIENT_CONCURRENCY in flight (senders.py)."""
    warmup, measured = prompts[: spec.warmup], prompts[spec.warmup :]
    if spec.mode == "concurrency":
        workers, arrivals = int(value), [0.0] * len(measured)
    else:
        workers = spec.max_concurrency
        arrivals = poisson_schedule(value, len(measured), rng.randrange(2**32))
    if warmup:
        await send(client, warmup, [0.0] * len(warmup), min(workers, len(warmup)))
    before = await asyncio.to_thread(scrape, metrics_urls)  # blocking HTTP, off the loop
    try:
        if spread is not None and workers > CLIENT_CONCURRENCY:
            records, duration = await spread.send(measured, arrivals, workers, progress.ended)
        else:
            records, duration = await send(client, measured, arrivals, workers, progress.advance)
    finally:
        progress.close()
    moved = (await asyncio.to_thread(scrape, metrics_urls)).since(before)
    return summarize(spec.mode, value, records, duration, moved, before.rss_bytes)


class Progress:
    """`point 2/3 c=16 [#####.....] 32/64` on one line of `out`, redrawn in place."""

    def __init__(self, out: TextIO, title: str, total: int, width: int = 30) -> None:
        self.out, self.title, self.total, self.width = out, title, total, width
        self.done = self.failed = 0
        self._draw()

    def advance(self, record: RequestRecord) -> None:
        self.ended(record.ok)

    def ended(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        self._draw()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()

    def _draw(self) -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        failed = f" ({self.failed} failed)" if self.failed else ""
        self.out.write(f"\r{self.title} [{bar}] {self.done}/{self.total}{failed}")
        self.out.flush()
