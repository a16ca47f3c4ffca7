"""CPU ranks whose OpenMP threads sleep between parallel regions (the daemons' default,
`OMP_WAIT_POLICY=PASSIVE`) against threads that spin first (libgomp's own default,
`GOMP_SPINCOUNT=300000`), end to end on one deployment, side by side.

    python bench/omp_wait.py                          # deploy/local.yaml, c=1,8
    python bench/omp_wait.py --config deploy/tiny.yaml --concurrency 1,4,16 --json out.json

Each way runs `kvferry bench --config FILE` (the deployment started and stopped by it) with the
setting in the environment the daemons inherit, alternating --rounds times; the table has the
median of the rounds' TTFT p50, end-to-end p50 and output tokens/s at each point, and the
ratios. A CPU deployment's ranks share the host's cores (each sizes its thread pool to them):
a pool that spins after every op takes the cores another process's forward waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WAYS = {"sleep": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin": {"GOMP_SPINCOUNT": "300000"}}
FIGURES = (("ttft_ms", "TTFT p50 ms"), ("e2e_ms", "e2e p50 ms"), ("tok_s", "out tok/s"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="deploy/local.yaml")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args()


def run(args, way: str, out: Path) -> dict[int, dict]:
    """One `kvferry bench` run with the way's setting: point (concurrency) -> figures."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(WAYS[way])
    command = [
        sys.executable, "-m", "kvferry.daemon.cli.main", "bench", "--config", args.config,
        "--concurrency", args.concurrency, "--num-requests", str(args.num_requests),
        "--warmup", "2", "--input-len", str(args.input_len), "--output-len",
        str(args.output_len), "--idle", "0", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    points = json.loads(out.read_text())["points"]
    return {
        int(p["value"]): {
            "ttft_ms": p["ttft_ms"]["median"],
            "e2e_ms": p["e2e_ms"]["median"],
            "tok_s": p["output_throughput"],
        }
        for p in points
    }


def main() -> None:
    args = parse_args()
    rounds: dict[str, list[dict]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else reversed(WAYS):
                rounds[way].append(run(args, way, Path(tmp) / f"{way}-{r}.json"))
    points = sorted(rounds["sleep"][0])
    result = {
        way: {c: {f: statistics.median(run[c][f] for run in runs) for f, _ in FIGURES}
              for c in points}
        for way, runs in rounds.items()
    }  # fmt: skip
    print(f"{args.config}: OpenMP threads that sleep vs spin, median of {args.rounds} rounds")
    print(f"{'c':>4}" + "".join(f"{name + ', sleep / spin':>32}" for _, name in FIGURES))
    for c in points:
        cells = ""
        for figure, _ in FIGURES:
            sleep, spin = result["sleep"][c][figure], result["spin"][c][figure]
            cells += f"{f'{sleep:.1f} / {spin:.1f} ({sleep / spin:.2f}x)':>32}"
        print(f"{c:>4}{cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "points": result}, f, indent=1)


if __name__ == "__main__":
    main()
