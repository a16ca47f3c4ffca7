"""What one full pass of Python's garbage collector stops a daemon's processes for: with the
heap they build at start walked at every pass (CPython's default), and frozen out of the
collector's reach as the daemons and ranks do once ready (daemon/server/heap.py), side by side.

    python bench/gc_pauses.py                                     # deploy/tiny.yaml's decode-0
    python bench/gc_pauses.py --config deploy/one-gpu.yaml --daemon prefill-0 --json out.json

This process imports what a daemon's and a rank's processes import (torch, the engine, the
transport, uvicorn and the HTTP front) and builds the model of `--daemon` (random weights, its
dtype, on its device, unsplit), then times `--passes` full passes (`gc.collect(2)`) with all of
it in the collector's reach, freezes it (`gc.freeze()`), and times as many again. Both ways the
heap also holds `--live` objects made after the start (requests in flight: their dicts, lists
and token lists), which every pass walks. Every thread
of a process waits while a pass runs (the GIL is held throughout): the HTTP front's streams in a
daemon, the engine's steps and the transfer thread in a rank. Under load CPython starts a full
pass whenever the objects that outlived younger passes reach a quarter of those it kept at the
last one, so what a pass walks is also about how often one comes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

import kvferry.daemon.server.daemon  # a daemon process's imports: the front, …
import kvferry.daemon.server.worker  # noqa: F401  (a rank's: the engine, the transport)
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import random_weights
from kvferry.daemon.server.config import Deployment, load


def build(config_path: str, name: str) -> Model:
    """The model of daemon `name` in `config_path`, as one rank of TP1 would hold it."""
    deployment = load(config_path, Deployment)
    daemon = next((d for d in deployment.daemons if d.name == name), None)
    if daemon is None:
        names = ", ".join(d.name for d in deployment.daemons)
        raise SystemExit(f"--daemon {name!r}: not in {config_path} (it has {names})")
    device = "cuda" if daemon.device == "cuda" and torch.cuda.is_available() else "cpu"
    config = daemon.model.model_config()
    weights = random_weights(config, daemon.model.seed)
    return Model(config, weights, dtype=getattr(torch, daemon.model.dtype), device=device)


def passes(count: int) -> list[float]:
    """Seconds of `count` full passes, one after the other."""
    took = []
    for _ in range(count):
        began = time.perf_counter()
        gc.collect(2)
        took.append(time.perf_counter() - began)
    return took


def requests(objects: int) -> list:
    """About `objects` objects the collector tracks, shaped as a request's bookkeeping."""
    return [{"tokens": [i], "marks": {"received": float(i)}} for i in range(objects // 3)]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="deploy/tiny.yaml", help="a deployment file")
    p.add_argument("--daemon", default="decode-0", help="whose model to build")
    p.add_argument("--passes", type=int, default=20, help="full passes timed each way")
    p.add_argument("--live", type=int, default=30_000, help="objects made after the start")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    model = build(args.config, args.daemon)  # kept alive: it is part of the heap measured
    live: list = []
    live[:] = requests(args.live)
    walked = len(gc.get_objects())
    walked_ms = statistics.median(passes(args.passes)) * 1e3
    live.clear()
    gc.freeze()
    live[:] = requests(args.live)  # made after the start: not frozen
    try:
        frozen = gc.get_freeze_count()
        left = len(gc.get_objects())
        frozen_ms = statistics.median(passes(args.passes)) * 1e3
    finally:
        gc.unfreeze()
    ratio = walked_ms / max(frozen_ms, 1e-6)
    print(f"{args.daemon} of {args.config}: {model.config.num_hidden_layers} layers, built here")
    print(f"{'heap':>10} {'objects walked':>15} {'full pass ms (median)':>22}")
    print(f"{'walked':>10} {walked:>15} {walked_ms:>22.2f}")
    print(f"{'frozen':>10} {left:>15} {frozen_ms:>22.2f}")
    print(f"a full pass, start-up heap walked / frozen: {ratio:.1f}x ({frozen} objects frozen)")
    if args.json:
        result = {
            "args": vars(args),
            "walked": {"objects": walked, "full_pass_ms": walked_ms},
            "frozen": {"objects": left, "frozen_objects": frozen, "full_pass_ms": frozen_ms},
            "ratio": ratio,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
