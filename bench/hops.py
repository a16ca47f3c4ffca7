"""Where one prompt's transfer spends its time, hop by hop: bench/overlap.py's latency run,
traced.

    python bench/hops.py                          # whole-chunk, a 2,048-token prompt on a GPU
    python bench/hops.py --runs 300 --layer-group 4 --json hops.json

A hop is a thread woken by an event (a control frame, a copy or UCX completion, a call posted
by the engine) that then runs its turn. This bench wraps, in its own process, the transfer
loops' wait (when each loop went to sleep, in its poll or its native sleep, and when it woke
with the GIL) and the calls a turn is made of (UCX progress, arm, send, probe, receive; a
copy's launch and its parts; control frames; the role's step), then runs `--runs`
single-prompt transfers one at a time and prints:

- for each stage of the request timeline (transport/timeline.py), in order: ms after the
  previous stage, split into the time until the thread that reached it woke and the time from
  its wake to the stage within its turn (medians over the runs);
- each traced call's median and p90 µs, and how often it ran per request;
- the wakes per request of each thread (the two loops and the engine's), and each loop's turns
  per request by what woke them (`AgentLoop.wakes`).

It reads the library's internals by name (it is a diagnostic, not an API): the names below
must follow them. The decode side runs in this process (`--decode-process` is not traced).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import select
import statistics
import sys
import threading
import time
from collections import defaultdict

import bench_model  # bench/ is on sys.path as a script
import overlap

from kvferry.staging import cuda_driver, kv_copy
from kvferry.staging.copy_stream import CopyStream
from kvferry.transport import loop as loop_module
from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.ucx import UcxDataPlane

ENGINE = "engine"  # the thread that runs the prefill engine's steps (this one)


class Trace:
    """Sleeps and wakes of every loop and of the engine thread, and spans of traced calls."""

    def __init__(self) -> None:
        self.wakes: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (woke, slept)
        self.spans: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
        self._lock = threading.Lock()

    def install(self) -> None:
        """Wrap the polls and calls; before any agent is built."""
        trace = self
        original_select, original_wait = select.select, loop_module.AgentLoop._wait

        def traced_select(*args):
            slept = time.time()
            ready = original_select(*args)
            if threading.current_thread() is threading.main_thread():
                trace.woke(ENGINE, slept)
            return ready

        overlap.select.select = traced_select  # the bench's engine loop sleeps in it

        def traced_wait(loop, sleep_s):  # its poll, or its native sleep, and the polls after
            slept = time.time()
            woken = original_wait(loop, sleep_s)
            trace.woke(loop._thread.name, slept)
            return woken

        loop_module.AgentLoop._wait = traced_wait
        for owner, name, label in (
            (AgentCore, "_read_frames", "control frames, copy completions"),
            (AgentCore, "_advance", "the role's step"),
            (DataPlane, "progress", "UCX progress"),
            (UcxDataPlane, "arm", "UCX arm"),
            (DataPlane, "send", "UCX send"),
            (DataPlane, "recv", "UCX receive"),
            (DataPlane, "probe", "UCX probe"),
            (CopyStream, "_run", "copy launch (all of it)"),
            (kv_copy, "_checked", "  its checks"),
            (cuda_driver, "copy_to_device", "  its index upload"),
            (cuda_driver, "launch_kernel", "  its kernel launch"),
            (cuda_driver, "launch_host_function", "  its wake's host function"),
        ):
            self._wrap(owner, name, label)

    def woke(self, thread: str, slept: float) -> None:
        with self._lock:
            self.wakes[thread].append((time.time(), slept))

    def _wrap(self, owner, name: str, label: str) -> None:
        original, spans = getattr(owner, name), self.spans

        @functools.wraps(original)
        def traced(*args, **kwargs):
            began = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                spans[label].append((threading.current_thread().name, began, time.time()))

        setattr(owner, name, traced)


def owner_of(stage: str) -> str:
    """The thread that reaches `stage`: the engine hands the forward over, the prefill loop
    the other prefill stages, the decode loop the decode stages."""
    if stage.endswith("_forward"):
        return ENGINE
    return "kvferry-prefill-0" if stage.startswith("prefill") else "kvferry-decode-0"


def analyse(trace: Trace, runs: list[tuple[float, dict[str, float]]]) -> dict:
    """`runs`: (submission time, the room's marks in absolute seconds) per request."""
    wakes = {thread: sorted(w) for thread, w in trace.wakes.items()}
    parts: dict[str, dict[str, list[float]]] = {}
    woken: dict[str, list[int]] = defaultdict(list)
    for submitted, marks in runs:
        end = max(marks.values())
        for thread, times in wakes.items():
            woken[thread].append(sum(submitted <= woke <= end for woke, _ in times))
        previous = submitted
        for stage, at in sorted(marks.items(), key=lambda item: item[1]):
            times = wakes.get(owner_of(stage), [])
            i = bisect.bisect_right(times, (at, float("inf"))) - 1
            if i < 0:
                continue
            woke = times[i][0]
            row = parts.setdefault(stage, {"after": [], "to_wake": [], "in_turn": []})
            row["after"].append((at - previous) * 1e3)
            row["to_wake"].append(max(woke - previous, 0.0) * 1e3)
            row["in_turn"].append((at - max(woke, previous)) * 1e3)
            previous = at
    stages = [
        {"stage": stage, **{k: statistics.median(v) for k, v in row.items()}}
        for stage, row in parts.items()
    ]
    order = {s: statistics.median(m[s] - t for t, m in runs if s in m) for s in parts}
    stages.sort(key=lambda row: order[row["stage"]])
    windows = [(submitted, max(marks.values())) for submitted, marks in runs]
    calls = {}
    for label, spans in trace.spans.items():
        inside = [(t1 - t0) * 1e6 for _, t0, t1 in spans if any(a <= t0 <= b for a, b in windows)]
        if inside:
            inside.sort()
            calls[label] = {
                "median_us": statistics.median(inside),
                "p90_us": inside[int(0.9 * (len(inside) - 1))],
                "per_request": len(inside) / len(runs),
            }
    chain = [m["kv_ready"] - m["prefill_last_forward"] for _, m in runs if _chain(m)]
    return {
        "stages": stages,
        "calls": calls,
        "wakes_per_request": {t: statistics.median(n) for t, n in woken.items()},
        "forward_to_kv_landed_ms": statistics.median(chain) * 1e3 if chain else None,
    }


def _chain(marks: dict[str, float]) -> bool:
    return "kv_ready" in marks and "prefill_last_forward" in marks


def main() -> None:
    runs_parser = argparse.ArgumentParser(add_help=False)
    runs_parser.add_argument("--runs", type=int, default=200, help="single-prompt transfers")
    own, rest = runs_parser.parse_known_args()
    sys.argv[1:] = rest
    args = overlap.parse_args(overlap.__doc__)  # the model, prompt and transfer settings
    if args.decode_process:
        raise SystemExit("hops.py traces its own process only: drop --decode-process")
    trace = Trace()
    trace.install()
    model = bench_model.build_model(args)
    device = model.device
    bench = overlap.Bench(args, model, args.layer_group, taper=not args.uniform)
    try:
        prompt = bench.prompts(1)
        for _ in range(5):  # warm-up: kernels, endpoints, the ring
            bench.run(prompt)
        bench.timelines.clear()
        loops = {loop._thread.name: loop for loop in bench._loops()}
        wakes_before = {name: dict(loop.wakes) for name, loop in loops.items()}
        planes = {core.loop._thread.name: core.data for core in bench._cores()}
        asleep_before = {name: data.sleep_events for name, data in planes.items()}
        starts = []
        for _ in range(own.runs):
            starts.append(time.time())
            bench.run(prompt)
        wakes = {  # each loop's turns per request by what woke them (transport/loop.py)
            name: {c: (n - wakes_before[name][c]) / own.runs for c, n in loop.wakes.items()}
            for name, loop in loops.items()
        }
        asleep = {  # UCX events each loop took in its native sleep, without a turn
            name: (data.sleep_events - asleep_before[name]) / own.runs
            for name, data in planes.items()
        }
    finally:
        bench.close()
    runs = [
        (start, {k: start + ms / 1e3 for k, ms in timeline.items()})
        for start, timeline in zip(starts, bench.timelines, strict=True)
    ]
    result = analyse(trace, runs)
    result["loop_wakes_per_request"] = wakes
    result["sleep_events_per_request"] = asleep
    mode = f"layer-wise ({args.layer_group}{', uniform' if args.uniform else ''})"
    mode = mode if args.layer_group else "whole-chunk"
    print(f"{own.runs} single-prompt transfers of {args.prompt} tokens, {mode}, on {device}")
    print(f"{'stage':24}{'after the last':>16}{'until woken':>13}{'in its turn':>13}  (ms)")
    for row in result["stages"]:
        print(f"{row['stage']:24}{row['after']:16.3f}{row['to_wake']:13.3f}{row['in_turn']:13.3f}")
    chain = result["forward_to_kv_landed_ms"]
    if chain is not None:
        landed = "KV ready at decode (its room succeeded there)"
        print(f"forward handed over -> {landed}: {chain:.3f} ms (median)")
    print(f"{'call':36}{'median us':>11}{'p90 us':>9}{'per request':>13}")
    for label, call in result["calls"].items():
        print(
            f"{label:36}{call['median_us']:11.1f}{call['p90_us']:9.1f}{call['per_request']:13.2f}"
        )
    woken = ", ".join(f"{t} {n:g}" for t, n in result["wakes_per_request"].items())
    print(f"wakes per request: {woken}")
    for name, causes in wakes.items():
        woken = ", ".join(f"{cause} {n:.2f}" for cause, n in causes.items() if n)
        print(f"{name} turns per request woken by: {woken}")
    for name, events in asleep.items():
        print(f"{name} UCX events per request taken asleep, without a turn: {events:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": own.runs, **result}, f, indent=1)


if __name__ == "__main__":
    main()
