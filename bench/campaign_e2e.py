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
import subprocess
import sys
from pathlib import Path

import yaml
from campaign_summary import read_json  # bench/ is on sys.path (a script)

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
    for n in range(rounds):
        for variant in args.variants if n % 2 == 0 else args.variants[::-1]:
            path = args.out_dir / f"deploy-{variant}.yaml"
            command = [sys.executable, "-m", "kvferry.daemon.cli.main", "bench"]
            command += ["--config", str(path), "--concurrency", args.concurrency, *load]
            command += ["--label", variant, "--out", str(_out(args.out_dir, variant, n, rounds))]
            if not stage.run(command):
                failed.add(variant)
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
    """Measured requests per point: 64, or four waves of the highest concurrency. Every point
    starts with a burst of its concurrency's requests at once; over two waves (64 at c=32) half
    the samples were that burst and the point lasted under a second, so its TTFT was the cold
    burst's more than the concurrency's."""
    return max(64, 4 * max(int(c) for c in concurrency.split(",")))


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
    return raw
