"""What the transfer thread's steps cost on the host: CPU µs per call, one call at a time.

    python bench/host_costs.py                    # GPU if present (UCX with cuda_ipc), else CPU
    python bench/host_costs.py --json out.json

A decode agent over UCX (the daemons' data plane) with a cache of --tokens slots; each step is
timed on the thread that runs it in a daemon: the loop's own steps on the loop thread (through
posted calls), the copies where the loop launches them. "loop turn" is one whole turn of an
otherwise idle loop, woken by a posted call: the floor every event pays. A request costs a
control-plane CPU time of about (turns per request, `kvferry bench --out`'s `loop_turns`) x
the turn, plus its copies and messages. Each step is measured twice: with the process
otherwise quiet, and while another thread runs a forward's small ops back to back (a rank's
main thread), whose kernel launches contend with the transfer thread's for the CUDA context.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.transport.config import TransferConfig
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.ucx import UcxDataPlane
from kvferry.transport.ucxx_ops import array_of

GPU_TLS, CPU_TLS = "cuda_ipc,cuda_copy,tcp,sm,self", "tcp,sm,self"


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096, help="cache slots")
    p.add_argument("--chunk", type=int, default=512, help="tokens per copy")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args()


def per_call(fn, calls: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per call of `fn` on this thread, after a few warm-up calls."""
    for _ in range(10):
        fn()
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (
        (time.thread_time() - cpu) / calls * 1e6,
        (time.perf_counter() - wall) / calls * 1e6,
    )


def on_loop(agent: DecodeAgent, fn, calls: int) -> tuple[float, float]:
    """per_call(fn) run on the agent's loop thread."""
    done, result = threading.Event(), []
    agent.post(lambda: (result.append(per_call(fn, calls)), done.set()))
    if not done.wait(600):
        raise TimeoutError("the loop thread did not run the measurement")
    return result[0]


def loop_turn(agent: DecodeAgent, calls: int) -> tuple[float, float]:
    """Loop-thread CPU µs per turn woken by a posted no-op, and the wall µs of the round trip."""
    ran = threading.Event()

    def wake_and_wait() -> None:
        ran.clear()
        agent.post(ran.set)
        ran.wait(10)

    per_call(wake_and_wait, 10)
    loop = agent.core.loop
    cpu, turns, wall = loop.cpu_seconds(), loop.turns, time.perf_counter()
    for _ in range(calls):
        wake_and_wait()
    taken = loop.turns - turns
    return (
        (loop.cpu_seconds() - cpu) / taken * 1e6,
        (time.perf_counter() - wall) / calls * 1e6,
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    layout = KVLayout(
        model="bench",
        num_layers=args.layers,
        num_kv_heads=args.heads,
        head_dim=args.head_dim,
        dtype="bfloat16",
        page_size=16,
    )
    cache = torch.zeros(
        (layout.num_planes, args.tokens, args.heads, args.head_dim),
        dtype=torch.bfloat16,
        device=device,
    )
    planes = KVPlanes.from_cache(cache)
    tls = GPU_TLS if gpu else CPU_TLS
    config = TransferConfig(
        chunk_tokens=args.chunk,
        staging_bytes=64 << 20,
        ucx_tls=tls,
        heartbeat_interval_s=60.0,
        heartbeat_timeout_s=120.0,
    )
    agent = DecodeAgent(
        config, layout, planes, UcxDataPlane(tls, device.index or 0 if gpu else None)
    )
    try:
        quiet = measure(agent, planes, args)
        with Forward(device):  # another thread of the process launching a forward meanwhile
            busy = measure(agent, planes, args)
    finally:
        agent.close()
    rows = {
        "copy MiB": quiet["copy MiB"],
        "steps": quiet["steps"],
        "during a forward": busy["steps"],
    }
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(
        f"device: {name}; UCX_TLS={tls}; {args.layers} layers x {args.heads} KV heads x "
        f"{args.head_dim}, copies of {args.chunk} tokens ({rows['copy MiB']:.1f} MiB)"
    )
    print(f"{'':44}{'quiet':>20}{'during a forward':>20}")
    print(f"{'step':44}" + f"{'CPU us':>10}{'wall us':>10}" * 2)
    for step, (cpu, wall) in rows["steps"].items():
        busy_cpu, busy_wall = rows["during a forward"][step]
        print(f"{step:44}{cpu:10.1f}{wall:10.1f}{busy_cpu:10.1f}{busy_wall:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), **rows}, f, indent=1)


class Forward:
    """A thread that runs an eager forward's worth of small ops back to back, as a rank's main
    thread does while its transfer thread works (on a GPU: kernel launches into the same
    context; on a CPU: the same cores)."""

    def __init__(self, device: torch.device) -> None:
        self._x = torch.randn(64, 1024, device=device)
        self._w = torch.randn(1024, 1024, device=device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x = self._x
        while not self._stop.is_set():
            for _ in range(64):
                x = torch.nn.functional.silu(x @ self._w) * 1e-3 + self._x
            if x.device.type == "cuda":
                torch.cuda.current_stream().synchronize()

    def __enter__(self) -> Forward:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(agent: DecodeAgent, planes: KVPlanes, args) -> dict:
    core, data, calls = agent.core, agent.core.data, args.calls
    slots = np.random.default_rng(0).permutation(args.tokens)[: args.chunk].astype(np.int64)
    nbytes = planes.staging_bytes(args.chunk, planes.num_heads)
    offset = core.staging.alloc(nbytes)
    region = core.staging.region(offset, nbytes)
    gpu = planes.device.type == "cuda"

    def gather() -> None:
        core.copies.gather(planes, slots, 0, planes.num_heads, region)

    def event() -> None:
        torch.cuda.Event(blocking=True).record()

    steps = {
        "loop turn (idle, woken by a posted call)": loop_turn(agent, calls),
        "UCX worker progress()": on_loop(agent, data.progress, calls),
        "UCX worker arm()": on_loop(agent, data.arm, calls),
        "UCX tag probe, nothing waiting": on_loop(agent, data.probe, calls),
        "ucxx Array of a staging region": on_loop(agent, lambda: array_of(region), calls),
        "gather launch (checks, index upload, kernel)": on_loop(agent, gather, calls // 10),
    }
    if gpu:
        steps["blocking-sync CUDA event, created + recorded"] = on_loop(agent, event, calls)
        torch.cuda.synchronize()
    return {"copy MiB": nbytes / 2**20, "steps": steps}


if __name__ == "__main__":
    main()
