"""`kvferry bench`'s pieces on their own: the statistics, the table, sending against a fake
client, and its client against a stub daemon. The workload: test_bench_workload.py; the command
itself: test_bench_command.py."""

import asyncio

import pytest

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.columns import format_table
from kvferry.daemon.cli.bench.lines import first_wave_lines, rss_lines
from kvferry.daemon.cli.bench.report import (
    Counters,
    RequestRecord,
    latency,
    percentile,
    summarize,
    table,
)
from kvferry.daemon.cli.bench.run import BenchSpec, Progress, send
from kvferry.daemon.cli.bench.workload import (
    BenchError,
    Prompt,
)
from kvferry.daemon.cli.client import (
    KEEPALIVE_EXPIRY_S,
    Completion,
    ConnectionReset,
    RequestTimeout,
    ServerError,
    Unreachable,
)
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.http_front import KEEP_ALIVE_S
from ports import free_port


def test_spec_checks_its_points():
    with pytest.raises(BenchError, match="exactly one"):
        BenchSpec()
    with pytest.raises(BenchError, match="exactly one"):
        BenchSpec(concurrency=(1,), request_rate=(2.0,))
    with pytest.raises(BenchError, match="> 0"):
        BenchSpec(request_rate=(0.0,))
    assert BenchSpec(request_rate=(2.0, 8.0)).mode == "request_rate"


# --- statistics and table -------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    assert latency([]).median is None
    assert latency([0.001, 0.003]).mean == pytest.approx(2.0)


def _record(index, tokens=5, ttft=0.1, latency_s=0.5, error=None, kind=None):
    return RequestRecord(
        index=index, sent_s=0.0, input_len=10, output_len=5, output_tokens=tokens,
        ttft_s=ttft, latency_s=latency_s, error=error, error_kind=kind,
    )  # fmt: skip


def test_a_point_counts_ok_and_failed_requests():
    records = [
        _record(0),
        _record(1, tokens=1),
        _record(
            2, tokens=0, ttft=None, error="HTTP 504: timeout: request unfinished", kind="timeout"
        ),
        _record(3, tokens=0, ttft=None, error="HTTP 504: timeout: after 5s", kind="timeout"),
        _record(4, tokens=0, ttft=None, error="connection refused", kind="unreachable"),
    ]
    moved = Counters(kv_bytes=3e9, messages=20, receives_ahead=15, ring_high_water_bytes=4096)
    point = summarize("concurrency", 4, records, duration_s=2.0, moved=moved)
    # failures group by kind, whatever their texts say
    assert (point.ok, point.failed, point.failures) == (2, 3, {"timeout": 2, "unreachable": 1})
    assert point.request_throughput == 1.0
    assert point.output_throughput == 3.0  # 6 tokens of ok requests in 2 s
    assert point.total_token_throughput == 13.0
    assert point.itl_ms.mean == pytest.approx(100.0)  # (0.5 - 0.1) / 4; one token has no gap
    assert (point.kv_gbps, point.messages_per_request) == (1.5, 4.0)
    assert point.ahead_per_message == 0.75
    names, row = table([point]).splitlines()[1:]
    at = names.index("ahead/msg") + len("ahead/msg")  # right-aligned under its name
    assert row[:at].split()[-1] == "0.75"


def test_the_first_wave_of_a_concurrency_point_is_kept_out_of_its_latencies():
    # c=2: the first two requests went out together (a burst), the rest as others ended
    records = [_record(0, ttft=0.9), _record(1, ttft=0.7), _record(2), _record(3, ttft=0.3)]
    point = summarize("concurrency", 2, records, 1.0, Counters())
    assert (point.first_wave, point.ok) == (2, 4)  # still counted in throughput
    assert point.ttft_ms.median == pytest.approx(200.0)  # of requests 2 and 3
    assert point.first_wave_ttft_ms.median == pytest.approx(800.0)
    assert point.e2e_ms.mean == pytest.approx(500.0)
    assert first_wave_lines([point]) == [
        "c=2: the first 2 requests, sent at once, are left out of the latencies above; "
        "their TTFT p50 800.0 ms, p90 880.0 ms"
    ]
    # too few after the wave, a single request in flight, or a request rate: every one counts
    cases = [("concurrency", 2, 3), ("concurrency", 1, 4), ("request_rate", 2, 4)]
    for mode, value, count in cases:
        point = summarize(mode, value, records[:count], 1.0, Counters())
        assert point.first_wave == 0 and first_wave_lines([point]) == []
        every = [1e3 * r.ttft_s for r in records[:count]]
        assert point.ttft_ms.median == pytest.approx(percentile(every, 50))


def test_counters_since_keep_the_gauges_and_count_what_grew():
    before = Counters(
        kv_bytes=10,
        messages=2,
        receives_ahead=1,
        ring_high_water_bytes=5,
        transfer_failures={"a": 1},
        transfer_cpu_s={"prefill": 1.0, "decode": 2.0},
        transfer_rooms={"prefill": 10, "decode": 10},
        ring_waits={"prefill": 1},
        ring_wait_s={"prefill": 0.5},
        memory_peak_bytes=7,
    )
    after = Counters(
        kv_bytes=30,
        messages=5,
        receives_ahead=3,
        ring_high_water_bytes=8,
        transfer_failures={"a": 1, "timeout": 2},
        transfer_cpu_s={"prefill": 1.5, "decode": 2.0004},
        transfer_rooms={"prefill": 20, "decode": 14},
        ring_waits={"prefill": 4, "decode": 2},
        ring_wait_s={"prefill": 0.6, "decode": 0.04},
        memory_peak_bytes=9,
    )
    moved = after.since(before)
    assert (moved.kv_bytes, moved.messages, moved.ring_high_water_bytes) == (20, 3, 8)
    assert moved.receives_ahead == 2
    assert moved.transfer_failures == {"timeout": 2} and moved.memory_peak_bytes == 9
    assert moved.control_cpu_us() == pytest.approx({"prefill": 50_000, "decode": 100})
    assert moved.ring_waits == {"prefill": 3, "decode": 2}
    waits, waited = moved.ring_waits_per_room()
    assert waits == pytest.approx({"prefill": 0.3, "decode": 0.5})  # per room delivered
    assert waited == pytest.approx({"prefill": 10.0, "decode": 10.0})


def test_table_aligns_columns_under_their_groups():
    header = [("", "point"), ("", "ok"), ("TTFT ms", "p50"), ("TTFT ms", "p99")]
    text = format_table(header, [["c=1", "8", "12.5", "20.0"], ["c=16", "128", "130.25", "7.0"]])
    groups, names, *rows = text.splitlines()
    assert names.split() == ["point", "ok", "p50", "p99"]
    assert groups.strip() == "TTFT ms" and groups.index("TTFT") >= names.index("ok") + 2
    # right-aligned numbers: each column ends where its header ends
    for line in rows:
        for name in ("ok", "p50", "p99"):
            end = names.index(name) + len(name)
            assert line[end - 1] != " " and (end == len(line) or line[end] == " ")
    assert rows[0].startswith("c=1 ") and rows[1].startswith("c=16")


def test_resets_are_failures_of_their_own_column_and_rss_is_shown_per_daemon():
    records = [_record(0), _record(1, error="connection lost", kind="reset")]
    moved = Counters(rss_bytes={"decode-0": 3 * 2**20, "prefill-0": 2**20})
    point = summarize("concurrency", 2, records, 1.0, moved, {"decode-0": 2 * 2**20})
    assert (point.failed, point.resets, point.failures) == (1, 1, {"reset": 1})
    names, row = table([point]).splitlines()[1:]
    assert row.split()[names.split().index("reset")] == "1"
    assert rss_lines([point]) == ["daemons' RSS MiB, c=2: decode-0 2.0 -> 3.0, prefill-0 ? -> 1.0"]


def test_the_result_table_has_one_row_per_point():
    points = [summarize("request_rate", r, [_record(0)], 1.0, Counters()) for r in (2.0, 8.0)]
    lines = table(points).splitlines()
    assert len(lines) == 4  # groups, names, two points
    assert lines[2].startswith("rate=2/s") and lines[3].startswith("rate=8/s")


def test_progress_redraws_one_line():
    class Out:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Out()
    progress = Progress(out, "point 2/3 c=16", total=4, width=8)
    progress.advance(_record(0))
    progress.advance(_record(1, error="boom"))
    progress.close()
    assert out.text.split("\r")[-1] == "point 2/3 c=16 [####....] 2/4 (1 failed)\n"


# --- sending, against a fake client --------------------------------------------------------


class _FakeClient:
    """Answers after `delay` s, counts requests in flight; prompts of [0] fail."""

    def __init__(self, delay: float) -> None:
        self.delay, self.in_flight, self.most = delay, 0, 0

    async def stream(self, request):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        if request.prompt == [0]:
            raise ServerError("http://fake", "HTTP 502: transfer failed: peer lost", 502)
        assert request.stream and request.temperature == 0.0
        ids = list(range(request.max_tokens))
        return Completion(
            text="", token_ids=ids, prompt_tokens=len(request.prompt), finish_reason="length",
            ttft_s=self.delay / 2, latency_s=self.delay,
        )  # fmt: skip


def test_send_keeps_the_concurrency_and_records_every_request():
    fake = _FakeClient(delay=0.05)
    prompts = [
        Prompt(prompt=[1, 2] if i != 3 else [0], input_len=2, output_len=3) for i in range(12)
    ]
    records, duration = asyncio.run(send(fake, prompts, [0.0] * 12, workers=4))
    assert fake.most == 4
    assert [r.index for r in records] == list(range(12))
    assert [r.ok for r in records].count(False) == 1 and "transfer failed" in records[3].error
    assert all(r.output_tokens == 3 for r in records if r.ok)
    assert duration >= 3 * 0.05


def test_send_follows_the_arrival_times():
    fake = _FakeClient(delay=0.01)
    prompts = [Prompt(prompt=[1], input_len=1, output_len=1)] * 3
    records, _ = asyncio.run(send(fake, prompts, [0.0, 0.1, 0.2], workers=256))
    assert [r.sent_s for r in records] == pytest.approx([0.0, 0.1, 0.2], abs=0.03)


# --- the bench's client against a stub daemon -----------------------------------------------


def _streamed(url: str, prompt, timeout: float = 5.0):
    """What AsyncDaemonClient.stream makes of `prompt`: a Completion or the ClientError."""

    async def run():
        async with AsyncDaemonClient(url, timeout, connections=2) as client:
            try:
                return await client.stream(CompletionRequest(prompt=prompt, max_tokens=3))
            except Exception as exc:
                return exc

    return asyncio.run(run())


def test_the_async_client_streams_and_names_each_failure(stub):
    done = _streamed(stub.url, "hi")
    assert done.token_ids == [72, 101, 108] and done.text == "Hello" and done.ttft_s > 0
    assert (done.prompt_tokens, done.finish_reason) == (3, "length")
    assert stub.seen[-1]["stream"] is True
    failures = {
        "too long": (ServerError, "http_400"),
        "fail midway": (ServerError, "server_error"),
        "cut short": (ConnectionReset, "reset"),
    }
    for prompt, (kind, name) in failures.items():
        failed = _streamed(stub.url, prompt)
        assert isinstance(failed, kind) and failed.kind == name, (prompt, failed)
    assert isinstance(_streamed(stub.url, "slow", timeout=0.3), RequestTimeout)
    refused = _streamed(f"http://127.0.0.1:{free_port()}", "hi")
    assert isinstance(refused, Unreachable) and refused.reason == "connection refused"


def test_clients_let_idle_connections_go_before_a_daemon_closes_them():
    """Else a request could go out on a connection the daemon is closing: a reset."""
    assert KEEPALIVE_EXPIRY_S < KEEP_ALIVE_S
