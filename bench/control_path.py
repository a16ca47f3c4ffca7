"""What one request costs the transfer threads when its KV is tiny: the control path alone.

    python bench/control_path.py                  # GPU if present (cuda_ipc), else CPU (tcp/sm)
    python bench/control_path.py --requests 500 --json out.json

The prefill and decode ranks, each a process of its own as in bench/transfer.py, move
--requests rooms one after the other: the decode ranks register each room, the prefill ranks
hand its KV over, every rank reports Success. The KV is a few tokens of
a small cache, so the copies and the wire cost next to nothing and what is measured is the
rest: frames, rooms, posted calls, turns, launches and posts. The figure is the transfer
threads' CPU per request, each side's ranks summed (what `kvferry bench` reports as
control-plane CPU per request, without a model, an engine or HTTP around it), split as the
loop's wait / UCX's calls / the rest, with the loop turns per request and the UCX events per
request the threads took asleep, in native code, without a turn (`asleep`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from loop_profile import add_profile_argument
from transfer_args import (  # bench/ is on sys.path (a script)
    add_data_path_argument,
    add_layout_argument,
    add_message_size_argument,
    data_paths,
    max_message_bytes,
    use_data_path,
)
from transfer_sides import Role

from kvferry.transport.bootstrap import BootstrapServer

GPU_TLS, CPU_TLS = "cuda_ipc,cuda_copy,tcp,sm,self", "tcp,sm,self"
PARTS = ("wait", "ucx")


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--chunk", type=int, default=16, help="transfer chunk tokens")
    p.add_argument("--src-tp", type=int, default=2)
    p.add_argument("--dst-tp", type=int, default=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--staging-mib", type=int, default=16)
    p.add_argument("--tls", default=None, help=f"UCX_TLS (default {GPU_TLS!r} on GPU, {CPU_TLS!r})")
    add_layout_argument(p)
    add_data_path_argument(p)
    add_profile_argument(p)
    add_message_size_argument(p)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    args.tls = args.tls or (GPU_TLS if args.device.startswith("cuda") else CPU_TLS)
    max_message_bytes(args)
    return args


def per_request(before: dict, after: dict, requests: int) -> dict:
    """One side's transfer-thread CPU µs (total and parts), loop turns per request and what
    woke them."""
    grown = {key: after[key] - before[key] for key in after if key != "loop_wakes"}
    wakes = {
        cause: (n - before["loop_wakes"].get(cause, 0)) / requests
        for cause, n in after["loop_wakes"].items()
    }
    total = grown["transfer_cpu_s"] / requests * 1e6
    parts = {part: grown[f"{part}_cpu_s"] / requests * 1e6 for part in PARTS}
    parts["rest"] = total - sum(parts.values())
    return {
        "cpu_us": total,
        "cpu_parts_us": parts,
        "turns": grown["loop_turns"] / requests,
        "timer_turns": grown["loop_timer_turns"] / requests,
        "quiet_turns": grown["loop_quiet_turns"] / requests,
        "sleep_events": grown["loop_sleep_events"] / requests,
        "wakes": wakes,
    }


def run(args: argparse.Namespace) -> dict:
    """args.requests rooms after args.warmup: each side's CPU per request, registration and
    hand-over-to-Success times."""
    server = BootstrapServer(args.src_tp)
    prefill = Role("prefill", args, "staged", server.address, server.token)
    decode = Role("decode", args, "staged", server.address)
    try:
        opened, moved = [], []
        for i in range(args.warmup + args.requests):
            if i == args.warmup:
                before = {"prefill": prefill("stats"), "decode": decode("stats")}
            room = 1000 + i
            began = time.monotonic()
            decode("open", room, args.tokens)  # registered with every prefill rank
            handed = prefill("send", room, args.tokens)[0]  # monotonic
            ended = decode("wait", room)[0]
            if i >= args.warmup:
                opened.append(handed - began)
                moved.append(ended - handed)
        after = {"prefill": prefill("stats"), "decode": decode("stats")}
    finally:
        decode.close()
        prefill.close()
        server.close()
    return {
        "sides": {s: per_request(before[s], after[s], args.requests) for s in before},
        "open_ms_p50": float(np.median(opened)) * 1e3,
        "transfer_ms_p50": float(np.median(moved)) * 1e3,
    }


def main() -> None:
    args = parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    runs = {}
    for path in data_paths(args):
        use_data_path(args, path)
        runs[path] = run(args)
    first = next(iter(runs))
    use_data_path(args, first)
    result = {"device": device, "args": vars(args), **runs[first], "path": first}
    for other in runs:
        if other != first:
            result[f"{other}_path"] = runs[other]
    print(
        f"{args.requests} requests of {args.tokens} tokens, TP{args.src_tp} -> TP{args.dst_tp}, "
        f"{args.layers} layers, on {device}"
    )
    print(
        f"{'path':9} {'side':8} {'CPU us/request':>15} {'wait':>7} {'ucx':>7} {'rest':>7} "
        f"{'turns':>6} {'quiet':>6} {'asleep':>7} {'register ms':>12} "
        f"{'hand-over to Success ms':>24}"
    )
    for path, one in runs.items():
        for side, row in one["sides"].items():
            parts = row["cpu_parts_us"]
            print(
                f"{path:9} {side:8} {row['cpu_us']:15.1f} {parts['wait']:7.1f} "
                f"{parts['ucx']:7.1f} {parts['rest']:7.1f} {row['turns']:6.2f} "
                f"{row['quiet_turns']:6.2f} {row['sleep_events']:7.2f} "
                f"{one['open_ms_p50']:12.2f} {one['transfer_ms_p50']:24.2f}"
            )
    for path, one in runs.items():
        for side, row in one["sides"].items():
            woken = ", ".join(f"{c} {n:.2f}" for c, n in sorted(row["wakes"].items()) if n)
            print(f"{path:9} {side:8} turns per request woken by: {woken}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
