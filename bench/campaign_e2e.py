"""The campaign's e2e stage: `kvferry bench` on variants of one deployment file, in rounds.

At high concurrency the end-to-end figures of one deployment spread by tens of percent from run
to run on a lent GPU, so a comparison of variants can take `--e2e-rounds N`: the variants run N
times in alternating order (no variant always first on a fresh machine), and each point of a
variant is the round whose TTFT p50 is the median of its rounds' (a point as it was measured,
not a blend of them), with every round's TTFT p50 beside it (`rounds_ttft_ms`).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from campaign_rows import Row, read_json  # bench/ is on sys.path (a script)

from kvferry.daemon.cli.bench.timeline import OUTSIDE_PARTS
from kvferry.daemon.cli.mps import CONTROL as MPS_CONTROL
from kvferry.transport.config import DEFAULT_STAGING_BYTES


def stage_e2e(stage) -> None:
    """`stage`: the campaign's Stage (its args, run, ok, note, log)."""
    args = stage.args
    base = yaml.safe_load(Path(args.deploy).read_text())
    load = ["--num-requests", "8", "--warmup", "1", "--input-len", "64", "--output-len", "8"]
    if not args.quick:
        load = ["--num-requests", str(num_requests(args.concurrency)), "--warmup", "4"]
        load += ["--input-len", "1024", "--output-len", "64", "--range-ratio", "0.5"]
    failed, rounds = set(), max(1, args.e2e_rounds)
    for variant in args.variants:
        path = args.out_dir / f"deploy-{variant}.yaml"
        path.write_text(yaml.safe_dump(deployment_variant(base, variant, args.layer_group)))
    on_mps = {**deployment_variant(base, "hetero", args.layer_group), "mps": "on"}
    (args.out_dir / "deploy-hetero-mps.yaml").write_text(yaml.safe_dump(on_mps))

    def bench(variant: str, out: Path) -> list[str]:
        command = [sys.executable, "-m", "kvferry.daemon.cli.main", "bench"]
        command += ["--config", str(args.out_dir / f"deploy-{variant}.yaml")]
        return [*command, "--concurrency", args.concurrency, *load, "--out", str(out)]

    for n in range(rounds):
        for variant in args.variants if n % 2 == 0 else args.variants[::-1]:
            out = _out(args.out_dir, variant, n, rounds)
            if not stage.run([*bench(variant, out), "--label", variant]):
                failed.add(variant)
    if args.gpu and not args.quick and "hetero" in args.variants and shutil.which(MPS_CONTROL):
        # the same daemons on a private MPS server (`mps: on`): the three ranks' kernels side
        # by side on the one GPU instead of a context at a time
        out = args.out_dir / "e2e-hetero-mps.json"
        if not stage.run([*bench("hetero-mps", out), "--label", "hetero on MPS"]):
            failed.add("hetero on MPS")
    if rounds > 1:
        for variant in args.variants:
            results = [read_json(_out(args.out_dir, variant, n, rounds)) for n in range(rounds)]
            results = [r for r in results if r]
            if results:
                merged = json.dumps(median_round(results), indent=1) + "\n"
                (args.out_dir / f"e2e-{variant}.json").write_text(merged)
    stage.ok = not failed
    stage.note = f"failed: {', '.join(sorted(failed))}; see {stage.log}" if failed else ""
    _plot(args, [v for v in args.variants if v not in failed])


def num_requests(concurrency: str) -> int:
    """Measured requests per point: 64, or eight waves of the highest concurrency. A point's
    first wave goes out at once, a burst its latencies leave out (`kvferry bench`'s
    `first_wave`); the seven after it are the samples, the loop full."""
    return max(64, 8 * max(int(c) for c in concurrency.split(",")))


def _out(out_dir: Path, variant: str, n: int, rounds: int) -> Path:
    return out_dir / (f"e2e-{variant}.json" if rounds == 1 else f"e2e-{variant}-round{n}.json")


def median_round(results: list[dict]) -> dict:
    """One variant's result from its rounds: at each point, the round whose TTFT p50 is the
    median (the lower one of an even count), with every round's TTFT p50 in `rounds_ttft_ms`."""
    merged = copy.deepcopy(results[0])
    merged["points"] = []
    for value in [p["value"] for p in results[0]["points"]]:
        same = [p for r in results for p in r["points"] if p["value"] == value]
        ttft = [p["ttft_ms"]["median"] for p in same]
        ranked = sorted(same, key=lambda p: (p["ttft_ms"]["median"] is None,
                                             p["ttft_ms"]["median"] or 0.0))  # fmt: skip
        chosen = dict(ranked[(len(ranked) - 1) // 2], rounds_ttft_ms=ttft)
        merged["points"].append(chosen)
    return merged


def _plot(args, variants: list[str]) -> None:
    outs = [str(args.out_dir / f"e2e-{v}.json") for v in variants]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[e2e] no matplotlib here: plot later with `kvferry bench plot`", flush=True)
        return
    if outs:
        png = str(args.out_dir / "e2e.png")
        subprocess.run(
            [sys.executable, "-m", "kvferry.daemon.cli.main", "bench", "plot", "--out", png, *outs],
            check=False,
        )


def deployment_variant(base: dict, variant: str, layer_group: int) -> dict:
    """`base` (heterogeneous TP, staged, whole-chunk) turned into one campaign variant."""
    raw = copy.deepcopy(base)
    raw["mps"] = "off"  # each process takes its turn on a shared GPU (`hetero-mps`: on MPS)
    daemons = raw["daemons"]
    prefill_tp = max(d.get("tp", 1) for d in daemons if d["role"] == "prefill")
    for daemon in daemons:
        transfer = daemon.setdefault("transfer", {})
        if variant == "layerwise":
            transfer["layer_group"] = layer_group
        elif variant == "slice":
            transfer["mode"] = "slice"
        elif variant == "homo" and daemon["role"] == "decode":
            daemon["tp"] = prefill_tp
        elif variant == "together" and daemon["role"] == "decode":
            ring = transfer.get("staging_bytes") or DEFAULT_STAGING_BYTES
            transfer["max_message_bytes"] = ring // 4
        elif variant == "tp1":  # no TP split: no all-reduce, the forwards as CUDA graphs
            daemon["tp"] = 1
        elif variant == "probe" and daemon["role"] == "decode":
            transfer["post_receives_ahead"] = False
    return raw


def e2e_rows(e2e: dict[str, dict | None], gpu: bool) -> list[Row]:
    """The summary's rows of the e2e stage, from each variant's `kvferry bench` result (None:
    not run): variants against homogeneous TP, TTFT scaling, the control path's CPU and turns
    per request, chunks together against one message per chunk, peak memory."""
    rows: list[Row] = []
    homo = e2e.get("homo")
    for variant in ("hetero", "layerwise", "slice"):
        result = e2e.get(variant)
        if not (result and homo):
            continue
        theirs = {p["value"]: p for p in homo["points"]}
        for point in result["points"]:
            other = theirs.get(point["value"])
            if other and other["output_throughput"]:
                ratio = point["output_throughput"] / other["output_throughput"]
                target = 0.95 if variant == "hetero" else None
                rows.append(Row(f"{variant} vs homogeneous output tok/s, c={point['value']:g}",
                                ratio, target, "%",
                                detail=f"{point['output_throughput']:.4g} vs "
                                       f"{other['output_throughput']:.4g}"))  # fmt: skip
    hetero = e2e.get("hetero")
    for variant, result in e2e.items():
        rows += scaling_rows(variant, result)
    if hetero:
        for role in ("prefill", "decode"):
            values = [p["control_cpu_us"].get(role) for p in hetero["points"]]
            values = [v for v in values if v is not None]
            if values:
                on_cpu = "" if gpu else "CPU: copies run on this thread too"
                rows.append(Row(f"control-plane CPU per request, {role} (worst point)",
                                max(values), 200.0, " us", higher_is_better=False,
                                detail=on_cpu))  # fmt: skip
            worst = max(
                (p for p in hetero["points"] if role in p.get("loop_turns", {})),
                key=lambda p: p["loop_turns"][role],
                default=None,
            )
            if worst is not None:
                what = f"transfer loop turns per request, {role} (worst point)"
                detail = "summed over the role's ranks"
                kinds = [worst.get(f"loop_{k}_turns", {}).get(role) for k in ("timer", "quiet")]
                if None not in kinds:
                    detail += f"; of which {kinds[0]:.3g} timer, {kinds[1]:.3g} quiet"
                rows.append(Row(what, worst["loop_turns"][role], None, detail=detail))
        rows += against_hetero(hetero, e2e.get("together"), "chunks together ÷ a message per chunk")
        rows += against_hetero(hetero, e2e.get("probe"), "receives posted ahead ÷ on arrival",
                               inverse=True)  # fmt: skip
        peak = max(p.get("memory_peak_bytes", 0) for p in hetero["points"])
        if peak:
            point = hetero["points"][-1]
            pool, ring = point["kv_pool_bytes"] / 2**30, point["ring_capacity_bytes"] / 2**30
            detail = f"KV pool {pool:.3g} GiB, staging ring {ring:.3g} GiB"
            rows.append(Row("peak device memory (torch allocator)", peak / 2**30, None, " GiB",
                            detail=detail))  # fmt: skip
    return rows


def against_hetero(hetero: dict, variant: dict | None, what: str, inverse=False) -> list[Row]:
    """A variant of hetero ÷ hetero (`inverse`: hetero ÷ the variant, for a variant that turns
    off what hetero does): the control-plane CPU per request of each side and TTFT p50, at
    every concurrency both ran. The variants: together (chunks ready together in one message,
    against a message per chunk) and probe (receives posted once their messages come)."""
    if not variant:
        return []
    rows, theirs = [], {p["value"]: p for p in hetero["points"]}
    for point in variant["points"]:
        other = theirs.get(point["value"])
        if not other:
            continue
        if inverse:
            point, other = other, point
        c = f"c={point['value']:g}"
        for role in ("prefill", "decode"):
            mine, base = point["control_cpu_us"].get(role), other["control_cpu_us"].get(role)
            if mine and base:
                rows.append(Row(f"{what}: control-plane CPU, {role}, {c}", mine / base, None, "x",
                                detail=f"{mine:.0f} vs {base:.0f} us"))  # fmt: skip
        mine, base = point["ttft_ms"]["median"], other["ttft_ms"]["median"]
        if mine and base:
            detail = f"{mine:.4g} vs {base:.4g} ms"
            if "rounds_ttft_ms" in point:  # --e2e-rounds: the median round, and every round's
                detail += f"; rounds {_ms(point)} vs {_ms(other)}"
            rows.append(Row(f"{what}: TTFT p50, {c}", mine / base, None, "x", detail=detail))
    return rows


def _ms(point: dict) -> str:
    return "/".join("-" if t is None else f"{t:.0f}" for t in point.get("rounds_ttft_ms", []))


def scaling_rows(variant: str, result: dict | None) -> list[Row]:
    """TTFT p50 at the highest concurrency over c=1, and the ranks' idle CPU."""
    if not result:
        return []
    rows = []
    points = sorted(result["points"], key=lambda p: p["value"])
    first, last = points[0], points[-1]
    if len(points) > 1 and first["ttft_ms"]["median"] and last["ttft_ms"]["median"]:
        ratio = last["ttft_ms"]["median"] / first["ttft_ms"]["median"]
        target = 2.0 if variant.startswith("hetero") else None  # as written, or on MPS
        rows.append(Row(f"{variant}: TTFT p50 c={last['value']:g} / c={first['value']:g}",
                        ratio, target, "x",
                        higher_is_better=False,
                        detail=f"{last['ttft_ms']['median']:.4g} vs "
                               f"{first['ttft_ms']['median']:.4g} ms"))  # fmt: skip
    if len(points) > 1:
        rows += _inside_outside_rows(variant, first, last)
    for point in (first, last) if len(points) > 1 else (first,):
        itl = point.get("itl_ms", {}).get("median")
        rows.append(Row(f"{variant}: ITL p50, c={point['value']:g}", itl, None, " ms",
                        higher_is_better=False,
                        detail=f"output {point['output_throughput']:.4g} tok/s"))  # fmt: skip
    for role, value in sorted((result.get("idle_cpu_s_per_min") or {}).items()):
        rows.append(Row(f"{variant}: idle ranks' CPU per minute, {role}", value, None, " s",
                        higher_is_better=False))  # fmt: skip
    return rows


def _inside_outside_rows(variant: str, first: dict, last: dict) -> list[Row]:
    """TTFT split at the decode daemon's first token out: inside the daemons (received to
    first token out), its c-ratio, and what the HTTP front and the client add outside."""
    inside = [_inside_ms(p) for p in (first, last)]
    if None in inside:
        return []
    outside = [p.get("ttft_outside_ms", {}).get("median") for p in (first, last)]
    rows = [Row(f"{variant}: TTFT in the daemons p50 c={last['value']:g} / c={first['value']:g}",
                inside[1] / inside[0], None, "x", higher_is_better=False,
                detail=f"{inside[1]:.4g} vs {inside[0]:.4g} ms: received to first token "
                       "out")]  # fmt: skip
    if None not in outside:
        parts, split = last.get("ttft_outside_parts_ms") or {}, ""
        if parts.keys() == OUTSIDE_PARTS.keys():
            values = "/".join(f"{parts[k]['median']:.2g}" for k in OUTSIDE_PARTS)
            split = f"; {' / '.join(OUTSIDE_PARTS.values())} {values} ms"
        rows.append(Row(f"{variant}: TTFT outside the daemons p50, c={last['value']:g}",
                        outside[1], None, " ms", higher_is_better=False,
                        detail=f"c={first['value']:g}: {outside[0]:.3g} ms; HTTP front and "
                               f"client{split}"))  # fmt: skip
    wave = last.get("first_wave_ttft_ms", {}).get("median")
    if wave:
        rows.append(Row(f"{variant}: TTFT p50 of c={last['value']:g}'s first wave", wave, None,
                        " ms", higher_is_better=False,
                        detail=f"{last['first_wave']} requests sent at once, left out of its "
                               "latencies"))  # fmt: skip
    return rows


def _inside_ms(point: dict) -> float | None:
    """Median of the requests' received -> first token out, ms (None without timelines), past
    the point's first wave."""
    wave = point.get("first_wave", 0)  # the burst its latencies leave out (kvferry bench)
    ends = [r["timeline"]["first_token_out"] for r in point.get("requests", [])
            if r["index"] >= wave and (r.get("timeline") or {}).get("first_token_out")]  # fmt: skip
    return statistics.median(ends) * 1e3 if ends else None
