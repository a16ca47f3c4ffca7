"""bench/campaign.py: its pieces, then a quick run of every stage on this machine (CPU)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ports import free_ports

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """Import a script of bench/ (not a package) without leaving bench/ on sys.path, where its
    file names would shadow installed packages for every later test."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


campaign = bench_module("campaign")
campaign_e2e = bench_module("campaign_e2e")
campaign_rows = bench_module("campaign_rows")
campaign_summary = bench_module("campaign_summary")


def test_variants_change_only_what_they_name():
    base = yaml.safe_load((ROOT / "deploy" / "tiny.yaml").read_text())
    hetero = campaign_e2e.deployment_variant(base, "hetero", 4)
    assert hetero == {
        "daemons": [{**d, "transfer": d.get("transfer", {})} for d in base["daemons"]],
        "mps": "off",  # every variant takes turns on a shared GPU; hetero-mps is hetero on MPS
    }
    layerwise = campaign_e2e.deployment_variant(base, "layerwise", 4)
    assert all(d["transfer"]["layer_group"] == 4 for d in layerwise["daemons"])
    sliced = campaign_e2e.deployment_variant(base, "slice", 4)
    assert all(d["transfer"]["mode"] == "slice" for d in sliced["daemons"])
    homo = campaign_e2e.deployment_variant(base, "homo", 4)
    assert [d["tp"] for d in homo["daemons"]] == [2, 2]
    together = campaign_e2e.deployment_variant(base, "together", 4)
    prefill, decode = together["daemons"]
    ring = decode["transfer"].get("staging_bytes") or (256 << 20)
    assert "max_message_bytes" not in prefill["transfer"]
    assert decode["transfer"]["max_message_bytes"] == ring // 4
    tp1 = campaign_e2e.deployment_variant(base, "tp1", 4)
    assert [d["tp"] for d in tp1["daemons"]] == [1, 1]
    assert [d["transfer"] for d in tp1["daemons"]] == [d["transfer"] for d in hetero["daemons"]]
    prefill, decode = campaign_e2e.deployment_variant(base, "probe", 4)["daemons"]
    assert decode["transfer"]["post_receives_ahead"] is False
    assert "post_receives_ahead" not in prefill["transfer"]
    assert [d["tp"] for d in base["daemons"]] == [2, 1]  # the base is left alone


def test_rounds_keep_at_each_point_the_round_of_median_ttft():
    def result(*ttfts):
        pairs = zip((1, 32), ttfts, strict=True)
        points = [{"value": c, "ttft_ms": {"median": t}, "ok": 8} for c, t in pairs]
        return {"label": "x", "points": points}

    merged = campaign_e2e.median_round([result(90, 600), result(95, 1900), result(None, 1200)])
    assert [p["ttft_ms"]["median"] for p in merged["points"]] == [95, 1200]
    assert [p["rounds_ttft_ms"] for p in merged["points"]] == [[90, 95, None], [600, 1900, 1200]]
    assert merged["label"] == "x"


def test_points_run_eight_waves_of_the_highest_concurrency():
    assert campaign_e2e.num_requests("1,4") == 64
    assert campaign_e2e.num_requests("1,32") == 256
    assert campaign_e2e.num_requests("64,1") == 512


def test_shared_gpu_all_reduce_rows_with_and_without_mps(tmp_path):
    shape = {"events_ms": 9.9, "host_ms": 15.6, "gloo_ms": 43.3, "none_ms": 4.0,
             "host_over_events": 1.58, "events_over_none": 2.5}  # fmt: skip
    on_mps = {**shape, "events_ms": 5.0, "events_time_sliced_over_mps": 1.98}
    reduce = {"shapes": {"small": shape}, "mps": {"small": on_mps}, "mps_note": ""}
    (tmp_path / "device_reduce.json").write_text(json.dumps(reduce))
    rows = {row.what: row for row in campaign_summary.summary_rows(tmp_path, gpu=True)}
    assert rows["TP2 on one GPU, a forward's all-reduces: host sync / events, small"].value == 1.58
    assert (
        "no all-reduce 4.00 ms"
        in rows["TP2 on one GPU, a forward's all-reduces: host sync / events, small"].detail
    )
    assert rows["TP2 on one GPU, a forward with events: time-sliced / MPS, small"].value == 1.98
    reduce.update(mps=None, mps_note="nvidia-cuda-mps-control is not on the PATH")
    (tmp_path / "device_reduce.json").write_text(json.dumps(reduce))
    rows = {row.what: row for row in campaign_summary.summary_rows(tmp_path, gpu=True)}
    assert rows["TP2 on one GPU on MPS"].verdict == "not measured"
    assert "not on the PATH" in rows["TP2 on one GPU on MPS"].detail


def test_staged_vs_raw_rows_time_sliced_and_on_mps(tmp_path):
    def row(gbps):
        return {"gbps": gbps, "request_mib": 64.0, "messages_per_request": 4}

    args = {"tokens": 512, "chunk": 128, "heads": 8, "src_tp": 2, "dst_tp": 1}
    transfer = {"rows": [row(1200.0), row(150.0), row(0.0)], "args": args}
    (tmp_path / "transfer.json").write_text(json.dumps(transfer))
    on_mps = {"rows": [row(1200.0), row(336.0)], "args": args}
    (tmp_path / "transfer-mps.json").write_text(json.dumps(on_mps))
    rows = {row.what: row for row in campaign_summary.summary_rows(tmp_path, gpu=True)}
    assert rows["staged vs raw ucxx, same bytes, one device"].value == 0.125
    mps = rows["staged vs raw ucxx, same bytes, one device, processes on MPS"]
    assert mps.value == 0.28 and mps.verdict == "MISSED" and "336 vs 1.2e+03" in mps.detail
    note = {"mps_note": "not measured: nvidia-cuda-mps-control is not on the PATH"}
    (tmp_path / "transfer-mps.json").write_text(json.dumps(note))
    rows = {row.what: row for row in campaign_summary.summary_rows(tmp_path, gpu=True)}
    mps = rows["staged vs raw ucxx, same bytes, one device, processes on MPS"]
    assert mps.verdict == "not measured" and "not on the PATH" in mps.detail


def test_overlap_rows_say_how_the_prompt_was_chunked(tmp_path):
    def run(name, ms):
        return {"name": name, "latency_ms": ms, "latency_overhead": ms / 100 - 1,
                "throughput_ratio": 0.97}  # fmt: skip

    runs = [run("local", 100.0), run("whole-chunk", 112.0), run("layer-wise (4)", 104.0)]
    runs[1]["stages_ms"], runs[2]["stages_ms"] = {"kv_ready": 110.0}, {"kv_ready": 99.0}
    for name, chunk in (("overlap-8192.json", 2048), ("overlap-8192-one-chunk.json", 8192)):
        body = {"args": {"prompt": 8192, "chunk": chunk}, "runs": runs}
        (tmp_path / name).write_text(json.dumps(body))
    rows = {row.what: row for row in campaign_summary.summary_rows(tmp_path, gpu=True)}
    one = rows["TTFT layer-wise / whole-chunk, 8192 tokens in one chunk"]
    assert one.value == pytest.approx(104 / 112) and one.verdict == "met"
    ready = rows["KV on decode, layer-wise / whole-chunk, 8192 tokens in one chunk"]
    assert ready.value == pytest.approx(0.9) and "99 vs 110 ms" in ready.detail
    chunked = rows["TTFT overhead vs colocated, whole-chunk, 8192 tokens in chunks of 2048"]
    assert chunked.verdict == "MISSED" and "112 vs 100 ms" in chunked.detail
    assert rows["TTFT overhead vs colocated, layer-wise (4), 8192 tokens in one chunk"].verdict == (
        "met"
    )


def test_rows_judge_against_their_targets():
    assert campaign_rows.Row("x", 0.95, 0.9, "%").verdict == "met"
    assert campaign_rows.Row("x", 0.85, 0.9, "%").verdict == "MISSED"
    assert campaign_rows.Row("x", 250, 200, " us", higher_is_better=False).verdict == "MISSED"
    assert campaign_rows.Row("x", 1.5, None).verdict == "reported"
    assert campaign_rows.Row("x", None, 1.0).verdict == "not measured"
    assert campaign_rows.Row("x", 0.5, 0.9, "%").cells()[1:3] == ["50%", "≥ 90%"]


def test_perftest_bandwidth_is_read_from_the_final_row(tmp_path):
    log = tmp_path / "perftest.log"
    log.write_text(
        "|  bandwidth (MB/s) |\n"
        "Final:   20   0.066   717.342   717.342    11152.28   11152.28   1394   1394\n"
    )
    assert campaign._perftest_gbps(log) == pytest.approx(11152.28 * 2**20 / 1e9)
    log.write_text("error while loading shared libraries\n")
    assert campaign._perftest_gbps(log) is None


def test_a_quick_campaign_runs_every_stage(tmp_path):
    """Every stage on CPU with small sizes; the GPU check reports itself skipped, not passed."""
    deploy = yaml.safe_load((ROOT / "deploy" / "tiny.yaml").read_text())
    prefill, decode = deploy["daemons"]
    http_p, boot, http_d = free_ports(3)
    prefill.update(http_port=http_p, bootstrap_port=boot)
    decode.update(http_port=http_d, prefill=[f"tcp://127.0.0.1:{boot}"])
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(deploy))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "campaign.py"), "--quick", "--out-dir", str(out),
         "--deploy", str(path), "--concurrency", "1,2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["check"] == {
        "ok": None,
        "note": "skipped: no GPU (the gpu tests need one)",
    }
    assert all(summary["stages"][s]["ok"] for s in campaign.STAGES if s != "check")
    figures = {row["what"]: row for row in summary["rows"]}
    for name in (
        "gather vs copy roofline (worst)",
        "staged vs raw ucxx, same bytes, one device",
        "staged vs per-token slices",
        "raw ucxx vs ucx_perftest",
        "prefill throughput with transfers, whole-chunk, 256 tokens in one chunk",
        "hetero vs homogeneous output tok/s, c=2",
        "control-plane CPU per request, decode (worst point)",
        "transfer loop turns per request, decode (worst point)",
        "transfer loop turn, host CPU, quiet",
        "transfer-thread CPU per staged message, prefill",
        "gather launch, host CPU, during a forward",
        "gather launch, wall, during a forward",
        "control path alone: transfer-thread CPU per request, prefill",
        "control path alone: transfer-thread CPU per request, decode",
        "one prompt, forward handed over -> room succeeded at decode, 256 tokens",
        "TTFT whole-chunk, prefill on arrival / held until registered, 256 tokens in one chunk",
        "TP step exchange (broadcast + verdicts), gloo / the ranks' pipes",
        "HTTP front's TTFT, c=32 / c=1",
        "bench client, httpx / aiohttp: TTFT p50 c=1 (a server answering at once)",
        "router, TTFT p50 through it / straight, c=8",
        "router CPU per relayed token, c=8",
        "prompt hand-off, a connection per request / kept, plain",
        "prompt hand-off, a connection per request / kept, curve",
        "HTTP front CPU per streamed token, c=32",
        "HTTP front, reports read on its loop / by a thread: TTFT p50, c=32",
        "HTTP front, Starlette's StreamingResponse / its own: TTFT p50, c=32",
        "hetero: TTFT in the daemons p50 c=2 / c=1",
        "hetero: TTFT outside the daemons p50, c=2",
        "receives posted ahead ÷ on arrival: TTFT p50, c=2",
        "a full GC pass, start-up heap walked / frozen",
    ):
        assert figures[name]["value"] is not None and figures[name]["value"] > 0, name
    assert figures["UCX messages per request / (chunks x writers)"]["verdict"] == "met"
    assert figures["hetero: TTFT p50 c=2 / c=1"]["value"] > 0
    assert figures["hetero: idle ranks' CPU per minute, decode"]["value"] >= 0
    for variant in campaign_summary.VARIANTS:
        points = json.loads((out / f"e2e-{variant}.json").read_text())["points"]
        assert [p["ok"] for p in points] == [8, 8], variant
    assert "figure" in run.stdout and "stage e2e: ok" in run.stdout


def test_hetero_on_mps_has_its_own_scaling_row(tmp_path):
    def point(c, ttft):
        return {"value": c, "ttft_ms": {"median": ttft}, "itl_ms": {"median": 1.0},
                "output_throughput": 100.0, "control_cpu_us": {}}  # fmt: skip

    sliced = {"points": [point(1, 16.0), point(32, 128.0)]}
    (tmp_path / "e2e-hetero.json").write_text(json.dumps(sliced))
    on_mps = {"points": [point(1, 16.0), point(32, 24.0)]}
    (tmp_path / "e2e-hetero-mps.json").write_text(json.dumps(on_mps))
    rows = {row.what: row for row in campaign_summary.summary_rows(tmp_path, gpu=True)}
    assert rows["hetero: TTFT p50 c=32 / c=1"].verdict == "MISSED"
    mps = rows["hetero on MPS: TTFT p50 c=32 / c=1"]
    assert mps.value == 1.5 and mps.verdict == "met" and "24 vs 16 ms" in mps.detail


def test_scaling_rows_leave_out_the_first_wave_and_split_what_is_outside():
    def request(index, first_token_out):
        return {"index": index, "timeline": {"first_token_out": first_token_out}}

    low = {"value": 1, "ttft_ms": {"median": 10.0}, "itl_ms": {"median": 1.0},
           "output_throughput": 100.0, "ttft_outside_ms": {"median": 1.5},
           "requests": [request(i, 0.008) for i in range(4)]}  # fmt: skip
    high = {**low, "value": 4, "ttft_ms": {"median": 20.0}, "ttft_outside_ms": {"median": 3.0},
            "first_wave": 4, "first_wave_ttft_ms": {"median": 90.0},
            "ttft_outside_parts_ms": {k: {"median": v} for k, v in
                                      (("front_in", 0.5), ("front_out", 1.0), ("client", 1.5))},
            # the first wave's own times (a burst) do not count: 16 ms inside, not 80
            "requests": [request(i, 0.08 if i < 4 else 0.016) for i in range(8)]}  # fmt: skip
    rows = {row.what: row for row in campaign_e2e.scaling_rows("hetero", {"points": [low, high]})}
    assert rows["hetero: TTFT in the daemons p50 c=4 / c=1"].value == pytest.approx(2.0)
    outside = rows["hetero: TTFT outside the daemons p50, c=4"]
    assert outside.value == 3.0
    assert "front in / front out / client and wire 0.5/1/1.5 ms" in outside.detail
    wave = rows["hetero: TTFT p50 of c=4's first wave"]
    assert wave.value == 90.0 and "4 requests sent at once" in wave.detail
