"""How a prefill forward's time splits between the host and the device, and what another
thread of the process costs it: launched eagerly, and as CUDA graph replays.

    python bench/forward_host.py                  # a 2,048-token forward of the overlap model
    python bench/forward_host.py --prompt 8192 --chunk 8192 --json out.json

The prefill engine launches a forward (and its first token's draw) from Python. Where that
launch takes longer than the device takes to run it, the forward is bound by the host, and any
Python another thread of the process runs meanwhile (the rank's transfer loop handling a
registration, a hand-over, a send's completion) lengthens it, however short the thread's own
turn. This bench measures, for the model of `bench/overlap.py`:

- the launch alone: the host's time to queue the forward while the device is held busy by a
  sleep kernel queued first (nothing the device does can slow the host down then);
- the device's time for the forward alone (events around it, queued behind the same sleep);
- the launch as the engine sees it (device idle at the start) — the colocated TTFT's forward;
- the same launch while a second thread runs Python turns of `--turn-us` µs every
  `--period-us` µs (a transfer loop's pattern, GIL only: no CUDA, no UCX), with the CPU that
  thread used; and while it calls `torch.cuda.Event.query` in its turns (a loop checking its
  copies), to tell the GIL's share from the CUDA driver's.

Each, for the forward launched eagerly and as replays of its CUDA graphs (as the daemons run
it on a GPU, daemon/engine/prefill_graphs.py), with the time from the launch's start until the
first token is on the host; then eager ÷ graphs (a forward of more than 4,096 tokens runs
eagerly in both: `prefill_graphs.MAX_TOKENS`). Each figure is the median over `--repeats`
forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
from bench_model import add_model_args, build_model  # bench/ is on sys.path as a script

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import PrefillScheduler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence

SLEEP_CYCLES = 200_000_000  # ~0.1 s of a GPU's clock: longer than any launch measured here


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p, gpu)
    p.add_argument("--prompt", type=int, default=2048 if gpu else 256)
    p.add_argument("--chunk", type=int, default=2048 if gpu else 256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15 if gpu else 3)
    p.add_argument("--turn-us", type=int, default=250, help="the other thread's turn, µs")
    p.add_argument("--period-us", type=int, default=1000, help="one turn every this many µs")
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args()


class Prefill:
    """One prompt's forward and first token, as the prefill engine launches them: eagerly, or
    as replays of the forward's CUDA graphs (`graphs`, engine/prefill_graphs.py)."""

    def __init__(self, args, model, graphs: bool) -> None:
        self.args, self.model = args, model
        pages = -(-args.prompt // args.page_size) + 1
        captured = {"graph_tokens": args.chunk} if graphs else {}
        self.runner = ModelRunner(model, BlockManager(pages, args.page_size), **captured)
        self.scheduler = PrefillScheduler(self.runner.blocks, args.chunk, args.chunk)
        self.prompt = list(range(1, args.prompt + 1))

    def launch(self) -> tuple[float, object]:
        """Queue the prompt's forwards and draws: (host seconds, the last draw's future)."""
        seq = Sequence(self.prompt, SamplingParams(max_tokens=1))
        self.scheduler.add(seq)
        began, future = time.perf_counter(), None
        while batch := self.scheduler.schedule():
            future = self.runner.sample_prompt_ends(batch, self.runner.forward(batch)) or future
            self.scheduler.computed(batch)
        launched = time.perf_counter() - began
        self._seq = seq
        return launched, future

    def finish(self, future) -> None:
        if future is not None:
            future.result()
        self.runner.blocks.deallocate(self._seq.id)


class Other:
    """A second thread taking Python turns of `turn_s` every `period_s` (a transfer loop's
    pattern); `query`: each turn also asks a CUDA event whether it fired."""

    def __init__(self, turn_s: float, period_s: float, query: bool) -> None:
        self.turn_s, self.period_s, self.query = turn_s, period_s, query
        self.event = torch.cuda.Event() if query else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.cpu_s = 0.0

    def __enter__(self) -> Other:
        if self.event is not None:
            self.event.record()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):  # sleeps without the GIL, as a poll does
            began = time.thread_time()
            end = time.perf_counter() + self.turn_s
            while time.perf_counter() < end:  # Python for the whole turn
                if self.event is not None:
                    self.event.query()
            self.cpu_s += time.thread_time() - began


def measure(prefill: Prefill, repeats: int, mode: str, other: Other | None = None) -> dict:
    """Median host launch ms (and device ms where measured) over `repeats` forwards."""
    launches, device, cpu, done = [], [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = end = None
        if mode != "idle":
            torch.cuda._sleep(SLEEP_CYCLES)  # the device is busy: the launch runs ahead of it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        cpu_before = other.cpu_s if other else 0.0
        began = time.perf_counter()
        launched, future = prefill.launch()
        if end is not None:
            end.record()
        prefill.finish(future)
        done.append((time.perf_counter() - began) * 1e3)
        launches.append(launched * 1e3)
        cpu.append(((other.cpu_s if other else 0.0) - cpu_before) * 1e3)
        if start is not None:
            device.append(start.elapsed_time(end))
    return {
        "launch_ms": statistics.median(launches),
        "device_ms": statistics.median(device) if device else None,
        "other_cpu_ms": statistics.median(cpu),
        "done_ms": statistics.median(done),  # launched until the first token is on the host
    }


def print_rows(variant: str, rows: dict) -> None:
    print(
        f"{variant + ':':34}{'launch ms':>10}{'device ms':>11}{'other CPU ms':>14}"
        f"{'launch +':>10}{'done ms':>9}"
    )
    base = rows["launch, device idle (colocated)"]["launch_ms"]
    for label, row in rows.items():
        dev = f"{row['device_ms']:11.2f}" if row["device_ms"] is not None else f"{'':11}"
        print(
            f"{label:34}{row['launch_ms']:10.2f}{dev}{row['other_cpu_ms']:14.2f}"
            f"{row['launch_ms'] - base:+10.2f}{row['done_ms']:9.2f}"
        )
    alone = rows["launch alone (device busy)"]
    bound = "host" if alone["launch_ms"] > alone["device_ms"] else "device"
    print(
        f"the forward is bound by the {bound}: launch {alone['launch_ms']:.2f} ms vs device "
        f"{alone['device_ms']:.2f} ms"
    )


def main() -> None:
    args = parse_args()
    if args.device != "cuda":
        raise SystemExit("forward_host.py measures a GPU's forward: run it on a GPU machine")
    model = build_model(args)
    turn, period = args.turn_us * 1e-6, args.period_us * 1e-6
    name = torch.cuda.get_device_name()
    print(
        f"{name}: {args.prompt}-token prompt in {args.chunk}-token forwards; the other "
        f"thread: {args.turn_us} µs turns every {args.period_us} µs"
    )
    results = {}
    for variant in ("eager", "graphs"):
        prefill = Prefill(args, model, graphs=variant == "graphs")
        for _ in range(3):  # warm-up: kernels compiled, allocator and pinned blocks cached
            prefill.finish(prefill.launch()[1])
        rows = results[variant] = {
            "launch alone (device busy)": measure(prefill, args.repeats, "busy"),
            "launch, device idle (colocated)": measure(prefill, args.repeats, "idle"),
        }
        with Other(turn, period, query=False) as other:
            rows["idle, + Python turns"] = measure(prefill, args.repeats, "idle", other)
        with Other(turn, period, query=False) as other:
            rows["busy, + Python turns"] = measure(prefill, args.repeats, "busy", other)
        with Other(turn, period, query=True) as other:
            rows["idle, + turns querying an event"] = measure(prefill, args.repeats, "idle", other)
        print_rows(variant, rows)
        del prefill
    eager, graphs = results["eager"], results["graphs"]
    print("eager ÷ graphs, ms (launch; launched until the first token is on the host):")
    for label in eager:
        e, g = eager[label], graphs[label]
        print(
            f"  {label:34}{e['launch_ms']:8.2f} ÷ {g['launch_ms']:6.2f} = "
            f"{e['launch_ms'] / g['launch_ms']:6.2f}×;{e['done_ms']:8.2f} ÷ {g['done_ms']:6.2f}"
            f" = {e['done_ms'] / g['done_ms']:5.2f}×"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
