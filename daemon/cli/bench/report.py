"""What `kvferry bench` makes of its requests: per-point statistics, the table on stdout and
the JSON records (the chart that compares result files is plot.py)."""

from __future__ import annotations

import math
import statistics
from collections import Counter

import msgspec

from kvferry.daemon.cli.bench.columns import format_table
from kvferry.daemon.cli.bench.timeline import outside_daemons, outside_parts, stage_shares


class RequestRecord(msgspec.Struct, kw_only=True):
    """One measured request; times in seconds, `sent_s` from the point's start."""

    index: int
    sent_s: float
    input_len: int  # prompt tokens as the daemon counted them, else as drawn
    output_len: int  # max_tokens asked for
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None  # None: ok
    error_kind: str | None = None  # the failure's kind (ClientError.kind)
    timeline: dict[str, float] | None = None  # the daemon's: stage -> s after it got it

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def itl_s(self) -> float | None:
        """Mean gap between this request's tokens after the first."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """The scraped daemons' counters, summed over daemons and ranks (per role where keyed by
    role); the byte gauges are the largest of any one rank."""

    kv_bytes: float = 0.0  # KV bytes received (decode)
    messages: float = 0.0  # data-plane messages received (decode)
    receives_ahead: float = 0.0  # of which taken by receives posted before they came (decode)
    ring_high_water_bytes: float = 0.0  # the most of any one ring, ever: a maximum, not a sum
    transfer_failures: dict[str, float] = msgspec.field(default_factory=dict)  # by kind
    transfer_cpu_s: dict[str, float] = msgspec.field(default_factory=dict)  # by role
    engine_cpu_s: dict[str, float] = msgspec.field(default_factory=dict)  # by role
    transfer_rooms: dict[str, float] = msgspec.field(default_factory=dict)  # by role
    loop_turns: dict[str, float] = msgspec.field(default_factory=dict)  # by role
    # of which only the loop's timer woke (a backstop while operations are in flight, timeouts,
    # heartbeats), and those that only moved a piece of a message still arriving, by role
    loop_timer_turns: dict[str, float] = msgspec.field(default_factory=dict)
    loop_quiet_turns: dict[str, float] = msgspec.field(default_factory=dict)
    # parts of transfer_cpu_s, by role: the loop's wait (poll, GIL) and UCX's own calls
    wait_cpu_s: dict[str, float] = msgspec.field(default_factory=dict)
    ucx_cpu_s: dict[str, float] = msgspec.field(default_factory=dict)
    # chunks that found a staging ring full, and the seconds they waited for room, by role
    ring_waits: dict[str, float] = msgspec.field(default_factory=dict)
    ring_wait_s: dict[str, float] = msgspec.field(default_factory=dict)
    memory_peak_bytes: float = 0.0  # torch allocator peak of any one rank
    kv_pool_bytes: float = 0.0
    ring_capacity_bytes: float = 0.0
    # resident memory of each daemon's own process (not its ranks'), by daemon name: a gauge
    rss_bytes: dict[str, float] = msgspec.field(default_factory=dict)
    # the garbage collector's passes, by "<daemon> <process>" (daemon, rank0, ...): seconds of
    # all of them, and how many were full passes
    gc_pause_s: dict[str, float] = msgspec.field(default_factory=dict)
    gc_full_passes: dict[str, float] = msgspec.field(default_factory=dict)

    def since(self, before: Counters) -> Counters:
        """What changed after `before`; the byte gauges stay as they are now."""
        return msgspec.structs.replace(
            self,
            kv_bytes=self.kv_bytes - before.kv_bytes,
            messages=self.messages - before.messages,
            receives_ahead=self.receives_ahead - before.receives_ahead,
            **{name: _grown(getattr(self, name), getattr(before, name)) for name in _KEYED},
        )

    def control_cpu_us(self) -> dict[str, float]:
        """Transfer-thread CPU µs per room delivered, by role (summed over the role's ranks)."""
        return self._per_room(self.transfer_cpu_s, 1e6)

    def control_cpu_parts_us(self) -> dict[str, dict[str, float]]:
        """control_cpu_us split, by role: the loop's wait, UCX's calls, and the rest (kvferry's
        own Python: frames, rooms, copies, sends)."""
        wait, ucx = self._per_room(self.wait_cpu_s, 1e6), self._per_room(self.ucx_cpu_s, 1e6)
        parts = {}
        for role, cpu in self.control_cpu_us().items():
            waited, in_ucx = wait.get(role, 0.0), ucx.get(role, 0.0)
            parts[role] = {"wait": waited, "ucx": in_ucx, "rest": cpu - waited - in_ucx}
        return parts

    def loop_turns_per_room(self) -> dict[str, float]:
        """Transfer-loop turns per room delivered, by role (summed over the role's ranks)."""
        return self._per_room(self.loop_turns, 1.0)

    def loop_turn_kinds_per_room(self) -> tuple[dict[str, float], dict[str, float]]:
        """Of those, the turns only the loop's timer woke and the quiet ones, per room
        delivered, by role."""
        return self._per_room(self.loop_timer_turns, 1.0), self._per_room(
            self.loop_quiet_turns, 1.0
        )

    def ring_waits_per_room(self) -> tuple[dict[str, float], dict[str, float]]:
        """Chunks that found a staging ring full, and the milliseconds they waited for room,
        per room delivered, by role."""
        return self._per_room(self.ring_waits, 1.0), self._per_room(self.ring_wait_s, 1e3)

    def _per_room(self, totals: dict[str, float], scale: float) -> dict[str, float]:
        return {
            role: totals.get(role, 0.0) / rooms * scale
            for role, rooms in self.transfer_rooms.items()
            if rooms > 0
        }


# the counters kept by key (failure kind or role): `since` subtracts them key by key
_KEYED = (
    "transfer_failures",
    "transfer_cpu_s",
    "engine_cpu_s",
    "transfer_rooms",
    "loop_turns",
    "loop_timer_turns",
    "loop_quiet_turns",
    "wait_cpu_s",
    "ucx_cpu_s",
    "ring_waits",
    "ring_wait_s",
    "gc_pause_s",
    "gc_full_passes",
)


def _grown(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    grown = {key: value - before.get(key, 0.0) for key, value in now.items()}
    return {key: value for key, value in grown.items() if value > 0}


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    """Milliseconds; None without samples."""

    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None


class Point(msgspec.Struct, kw_only=True):
    mode: str  # "concurrency" or "request_rate"
    value: float
    ok: int
    failed: int
    failures: dict[str, int]  # by failure kind
    duration_s: float
    request_throughput: float  # ok requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # prompt + output tokens / s
    ttft_ms: Latency
    itl_ms: Latency
    e2e_ms: Latency
    kv_bytes: float
    kv_gbps: float
    messages_per_request: float
    # decode data receives posted before their messages came, per message received
    ahead_per_message: float = 0.0
    ring_high_water_bytes: float
    transfer_failures: dict[str, float]
    requests: list[RequestRecord]
    control_cpu_us: dict[str, float] = msgspec.field(default_factory=dict)  # per request, by role
    # the same split into the loop's wait, UCX's calls and the rest, by role
    control_cpu_parts_us: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    loop_turns: dict[str, float] = msgspec.field(default_factory=dict)  # per request, by role
    # of which only the timer woke, and quiet ones (Counters.loop_timer_turns), per request
    loop_timer_turns: dict[str, float] = msgspec.field(default_factory=dict)
    loop_quiet_turns: dict[str, float] = msgspec.field(default_factory=dict)
    # chunks that found a staging ring full, and the ms they waited, per request, by role
    ring_waits: dict[str, float] = msgspec.field(default_factory=dict)
    ring_wait_ms: dict[str, float] = msgspec.field(default_factory=dict)
    memory_peak_bytes: float = 0.0  # torch allocator peak of any one rank (0 on a CPU)
    # each stage's share of TTFT over the requests with a timeline: stage -> {p50, p90}
    stages: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    # the client's TTFT less the decode daemon's first token out: HTTP front and client
    ttft_outside_ms: Latency = msgspec.field(default_factory=Latency)
    # that split: the front's way in and out, the client and the wire (timeline.outside_parts)
    ttft_outside_parts_ms: dict[str, Latency] = msgspec.field(default_factory=dict)
    # at a concurrency of c, the first c requests go out at once, a burst no later one meets:
    # how many were left out of the latency figures above (0: none), and their TTFT
    first_wave: int = 0
    first_wave_ttft_ms: Latency = msgspec.field(default_factory=Latency)
    kv_pool_bytes: float = 0.0  # of that size of rank: the budgets the peak holds
    ring_capacity_bytes: float = 0.0
    # each scraped daemon's process RSS before and after the measured requests
    rss_before_bytes: dict[str, float] = msgspec.field(default_factory=dict)
    rss_after_bytes: dict[str, float] = msgspec.field(default_factory=dict)
    # the garbage collector's passes meanwhile, by "<daemon> <process>": ms in all, full passes
    gc_pause_ms: dict[str, float] = msgspec.field(default_factory=dict)
    gc_full_passes: dict[str, float] = msgspec.field(default_factory=dict)

    @property
    def resets(self) -> int:
        """Requests whose connection the daemon closed or reset mid-answer (kind `reset`)."""
        return self.failures.get("reset", 0)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between the closest ranks."""
    assert values and 0 <= q <= 100, (len(values), q)
    ordered = sorted(values)
    at = q / 100 * (len(ordered) - 1)
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def latency(seconds: list[float]) -> Latency:
    if not seconds:
        return Latency()
    ms = [s * 1e3 for s in seconds]
    return Latency(
        mean=statistics.fmean(ms),
        median=percentile(ms, 50),
        p90=percentile(ms, 90),
        p99=percentile(ms, 99),
    )


def summarize(
    mode: str,
    value: float,
    records: list[RequestRecord],
    duration_s: float,
    moved: Counters,
    rss_before: dict[str, float] | None = None,
) -> Point:
    ok = [r for r in records if r.ok]
    wave = first_wave(mode, value, records)
    steady = [r for r in ok if r.index >= wave]  # what the latency figures are of
    burst = [r.ttft_s for r in ok if r.index < wave and r.ttft_s is not None]
    waits, waited = moved.ring_waits_per_room()
    timer_turns, quiet_turns = moved.loop_turn_kinds_per_room()
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.input_len for r in ok)
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    return Point(
        mode=mode,
        value=value,
        ok=len(ok),
        failed=len(records) - len(ok),
        failures=dict(Counter(r.error_kind or "unknown" for r in records if not r.ok)),
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        output_throughput=output * per_s,
        total_token_throughput=(prompt + output) * per_s,
        ttft_ms=latency([r.ttft_s for r in steady if r.ttft_s is not None]),
        itl_ms=latency([r.itl_s for r in steady if r.itl_s is not None]),
        e2e_ms=latency([r.latency_s for r in steady]),
        kv_bytes=moved.kv_bytes,
        kv_gbps=moved.kv_bytes * per_s / 1e9,
        messages_per_request=moved.messages / len(records) if records else 0.0,
        ahead_per_message=moved.receives_ahead / moved.messages if moved.messages else 0.0,
        ring_high_water_bytes=moved.ring_high_water_bytes,
        transfer_failures=moved.transfer_failures,
        requests=records,
        control_cpu_us=moved.control_cpu_us(),
        control_cpu_parts_us=moved.control_cpu_parts_us(),
        loop_turns=moved.loop_turns_per_room(),
        loop_timer_turns=timer_turns,
        loop_quiet_turns=quiet_turns,
        ring_waits=waits,
        ring_wait_ms=waited,
        memory_peak_bytes=moved.memory_peak_bytes,
        kv_pool_bytes=moved.kv_pool_bytes,
        ring_capacity_bytes=moved.ring_capacity_bytes,
        stages=stage_shares([r.timeline for r in steady if r.timeline]),
        ttft_outside_ms=latency(outside_daemons(steady)),
        ttft_outside_parts_ms={k: latency(v) for k, v in outside_parts(steady).items() if v},
        first_wave=wave,
        first_wave_ttft_ms=latency(burst),
        rss_before_bytes=rss_before or {},
        rss_after_bytes=moved.rss_bytes,
        gc_pause_ms={where: s * 1e3 for where, s in moved.gc_pause_s.items()},
        gc_full_passes=moved.gc_full_passes,
    )


def first_wave(mode: str, value: float, records: list[RequestRecord]) -> int:
    """How many of a point's first requests its latency figures leave out: at a concurrency of
    c, the first c go out together, a burst of c prompts at once that no later request meets
    (each later one starts as another ends); where at least c follow them, the figures are of
    those, the loop full. Nothing is left out at a request rate, whose arrivals are spread."""
    wave = int(value) if mode == "concurrency" else 0
    return wave if wave > 1 and len(records) >= 2 * wave else 0


def point_name(mode: str, value: float) -> str:
    return f"c={value:g}" if mode == "concurrency" else f"rate={value:g}/s"


_LATENCY_COLUMNS = [("mean", "mean"), ("p50", "median"), ("p90", "p90"), ("p99", "p99")]
HEADER = [
    ("", "point"), ("", "ok"), ("", "fail"), ("", "reset"), ("", "s"), ("", "req/s"),
    ("", "out tok/s"), ("", "tot tok/s"),
    *[(group, name) for group in ("TTFT ms", "ITL ms", "E2E ms") for name, _ in _LATENCY_COLUMNS],
    ("KV", "MiB"), ("KV", "GB/s"), ("KV", "msg/req"), ("KV", "ahead/msg"), ("KV", "ring MiB"),
    ("KV", "xfer fail"),
    ("ctl CPU us/req", "P"), ("ctl CPU us/req", "D"), ("", "peak GiB"),
]  # fmt: skip


def table(points: list[Point]) -> str:
    return format_table(HEADER, [_row(p) for p in points])


def _row(p: Point) -> list[str]:
    cells = [point_name(p.mode, p.value), str(p.ok), str(p.failed), str(p.resets)]
    cells.append(f"{p.duration_s:.2f}")
    cells += [f"{p.request_throughput:.2f}", f"{p.output_throughput:.1f}"]
    cells.append(f"{p.total_token_throughput:.1f}")
    for lat in (p.ttft_ms, p.itl_ms, p.e2e_ms):
        cells += [num(getattr(lat, field)) for _, field in _LATENCY_COLUMNS]
    cells += [f"{p.kv_bytes / 2**20:.2f}", f"{p.kv_gbps:.3f}", f"{p.messages_per_request:.1f}"]
    cells.append(f"{p.ahead_per_message:.2f}")
    cells += [f"{p.ring_high_water_bytes / 2**20:.2f}", f"{sum(p.transfer_failures.values()):g}"]
    cells += [num(p.control_cpu_us.get(role)) for role in ("prefill", "decode")]
    cells.append(f"{p.memory_peak_bytes / 2**30:.2f}" if p.memory_peak_bytes else "-")
    return cells


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
