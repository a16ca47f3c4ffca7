"""`kvferry bench` as a command: usage errors, then real runs against a small deployment
(prefill TP1 -> decode TP1, random model) and plots of their results."""

import json
import re
import statistics

import pytest

from support.cli_sim import invoke
from support.cluster import decode, prefill, running, write

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "http://127.0.0.1:1", "--config", "x.yaml"],
        ["--concurrency", "1,4", "--request-rate", "2"],
        ["--concurrency", "1,zero"],
        ["--request-rate", "-1"],
        ["--num-requests", "3", "plot", "--out", "x.png", __file__],
        ["--compare", __file__],
    ],
)
def test_usage_mistakes_exit_2(args):
    result = invoke("bench", *args)
    assert result.exit_code == 2, result.output


def test_help():
    assert invoke("bench", "--help").exit_code == 0
    assert invoke("bench", "plot", "--help").exit_code == 0


def test_an_unreachable_daemon_is_one_line_and_exit_1():
    result = invoke("bench", "--url", "http://127.0.0.1:1", "--concurrency", "1", "--warmup", "0")
    assert result.exit_code == 1
    assert "connection refused" in result.stderr


BENCH_ARGS = ["--num-requests", "8", "--warmup", "1", "--input-len", "32", "--output-len", "8"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    p = prefill("prefill-0")
    return write(tmp_path_factory.mktemp("bench"), [p, decode("decode-0", [p])])


@pytest.fixture(scope="module")
def result_file(deployment, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "homo.json"
    with running(deployment) as launcher:
        urls = {child.role: child.url for child in launcher.children}
        result = invoke(
            "bench", "--url", urls["decode"], "--metrics-url", urls["prefill"],
            "--concurrency", "1,4", *BENCH_ARGS, "--label", "homo", "--out", str(out),
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_a_sweep_against_real_daemons(result_file):
    path, stdout = result_file
    result = json.loads(path.read_text())
    assert result["label"] == "homo" and result["config"]["vocab"] == 256
    assert [p["value"] for p in result["points"]] == [1, 4]
    for point in result["points"]:
        assert (point["ok"], point["failed"], len(point["requests"])) == (8, 0, 8)
        records = point["requests"]
        assert all(r["error"] is None and 1 <= r["output_tokens"] <= 8 for r in records)
        tokens = sum(r["output_tokens"] for r in records)
        assert point["output_throughput"] * point["duration_s"] == pytest.approx(tokens)
        assert point["kv_bytes"] > 0 and point["messages_per_request"] > 0
        assert point["ring_high_water_bytes"] > 0 and point["transfer_failures"] == {}
        assert point["ttft_ms"]["median"] > 0
        assert set(point["control_cpu_us"]) == {"prefill", "decode"}
        assert all(us > 0 for us in point["control_cpu_us"].values())
        assert all(turns >= 1 for turns in point["loop_turns"].values())  # per request
        assert set(point["loop_turns"]) == {"prefill", "decode"}
        for kind in ("loop_timer_turns", "loop_quiet_turns"):  # parts of the turns, by role
            assert set(point[kind]) == {"prefill", "decode"}
            assert all(0 <= point[kind][r] <= point["loop_turns"][r] for r in point[kind])
        assert set(point["ring_waits"]) == set(point["ring_wait_ms"]) == {"prefill", "decode"}
        assert point["kv_pool_bytes"] > 0 and point["memory_peak_bytes"] == 0  # CPU daemons
        for rss in (point["rss_before_bytes"], point["rss_after_bytes"]):
            assert set(rss) == {"prefill-0", "decode-0"} and min(rss.values()) > 2**20
    for point in result["points"]:  # where TTFT went: the stages of both daemons, in order
        stages = list(point["stages"])
        last = "first_token_out"
        for stage in ("reserved", "prefill_sent", "scatter_queued", "kv_ready", last):
            assert stage in stages, (stage, stages)
        assert stages.index("reserved") < stages.index("prefill_sent") < stages.index(last)
        assert stages.index("scatter_queued") < stages.index("kv_ready") < stages.index(last)
        # a decode daemon of one rank sends the first token as the room succeeds, not with the
        # admission at the next step boundary
        assert "admitted" not in stages
        assert all(0 <= s["p50"] <= s["p90"] <= 1 for s in point["stages"].values())
        timelines = [r["timeline"] for r in point["requests"]]
        assert all(t["received"] == 0 and t["done"] >= t["first_token_out"] for t in timelines)
        # what the front and the client add: the client's TTFT less the daemon's first token
        # of the requests after the first wave (c=4: the four sent at once are left out)
        assert point["first_wave"] == (4 if point["value"] == 4 else 0)
        steady = [r for r in point["requests"] if r["index"] >= point["first_wave"]]
        outside = [r["ttft_s"] - r["timeline"]["first_token_out"] for r in steady]
        assert point["ttft_outside_ms"]["median"] == pytest.approx(statistics.median(outside) * 1e3)
        assert min(outside) > 0  # the first token reaches the client after the daemon sent it
        # ... split at the front's own marks: its headers in, before the daemon had it, and its
        # first chunk written, after the daemon's first token out (one with more chunks to come)
        assert "http_in" not in point["stages"]
        assert all(r["timeline"]["http_in"] < 0 for r in steady)
        marked = [r for r in steady if "first_chunk_sent" in r["timeline"]]
        assert all(r["output_tokens"] > 1 for r in marked)
        for r in marked:
            t = r["timeline"]
            # handed to the socket after the daemon's first token, and read by the client after
            # that: its TTFT spans the front's time from headers in to chunk out
            assert t["first_token_out"] <= t["first_chunk_sent"]
            assert t["first_chunk_sent"] - t["http_in"] < r["ttft_s"]
        parts = point["ttft_outside_parts_ms"]
        assert set(parts) == ({"front_in", "front_out", "client"} if marked else set())
        assert all(part["median"] >= 0 for part in parts.values())
    assert set(result["idle_cpu_s_per_min"]) == {"prefill", "decode"}
    assert all(s >= 0 for s in result["idle_cpu_s_per_min"].values())
    lines = stdout.splitlines()
    # last, a line per point where a process collected garbage: by daemon and process
    collected = [p for p in result["points"] if p["gc_pause_ms"]]
    gc_lines, lines = lines[len(lines) - len(collected) :], lines[: len(lines) - len(collected)]
    for point, line in zip(collected, gc_lines, strict=True):
        assert line.startswith(f"GC pauses, c={point['value']}, ms in all (full passes): "), line
        assert all(
            re.fullmatch(r"(prefill|decode)-0 (daemon|rank\d)", w) for w in point["gc_pause_ms"]
        )
        assert set(point["gc_full_passes"]) <= set(point["gc_pause_ms"])
    assert lines[2].startswith("c=1 ") and lines[3].startswith("c=4 ")
    assert lines[4].startswith("idle ranks' CPU, seconds per minute: decode ")
    assert lines[5] == "where TTFT goes, c=1 (stage ends; length and share of TTFT):"
    assert lines[-3].startswith("c=4: the first 4 requests, sent at once, are left out of the ")
    assert sum(line.startswith("  outside the daemons ") for line in lines) == 2
    assert lines[-2].startswith("daemons' RSS MiB, c=1: decode-0 ")
    assert lines[-1].startswith("daemons' RSS MiB, c=4: decode-0 ") and "prefill-0" in lines[-1]


def test_a_deployment_it_starts_itself_with_a_request_rate(deployment, result_file, tmp_path):
    out, png = tmp_path / "rate.json", tmp_path / "rate.png"
    result = invoke(
        "bench", "--config", str(deployment), "--request-rate", "20", *BENCH_ARGS,
        "--out", str(out), "--plot", str(png), "--compare", str(result_file[0]),
        "--trace", str(tmp_path / "trace.jsonl"), "--idle", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == 8 and all(t["ok"] and "prefill_sent" in t["timeline"] for t in trace)
    assert png.read_bytes().startswith(PNG_MAGIC)
    point = json.loads(out.read_text())["points"][0]
    assert (point["mode"], point["ok"]) == ("request_rate", 8)
    assert json.loads(out.read_text())["config"]["vocab"] == 258  # from the model's config


def test_plot_of_two_result_files(result_file, tmp_path):
    path, _ = result_file
    other = json.loads(path.read_text())
    other["label"] = "hetero"
    for point in other["points"]:
        point["output_throughput"] *= 2
    second = tmp_path / "hetero.json"
    second.write_text(json.dumps(other))
    png = tmp_path / "chart.png"
    result = invoke("bench", "plot", "--out", str(png), str(path), str(second))
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000


def test_plot_of_a_file_that_is_no_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"points": 3}')
    result = invoke("bench", "plot", "--out", str(tmp_path / "x.png"), str(bad))
    assert result.exit_code == 1
    assert "not a kvferry bench result" in result.stderr
