"""Staged transfer vs raw UCX vs per-token slices, for the same KV, between two processes.

    python bench/transfer.py                      # GPU if present (cuda_ipc), else CPU (tcp/sm)
    python bench/transfer.py --src-tp 2 --dst-tp 1 --tokens 8192 --json out.json

Each prefill rank (a process of its own, as a daemon runs it: `--layout`) sends each request's
KV to the decode ranks (likewise). "raw" sends the same number of bytes as one message per decode
rank between two bare UCX workers: the transport ceiling. "staged" is kvferry's transfer (one
message per chunk and writer). "slice" sends one message per token and layer plane, the way
per-token RDMA designs do; it runs on --slice-tokens tokens (it is slow) and is reported in the
same GB/s. Time runs from the moment the prefill ranks hand over the KV to the moment the last
decode rank reports Success (scatter done); room registration happens before.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from loop_profile import add_profile_argument
from timelines import stage_times  # bench/ is on sys.path (a script)
from transfer_args import (
    PAIRS,
    add_data_path_argument,
    add_layout_argument,
    add_message_size_argument,
    data_paths,
    max_message_bytes,
    use_data_path,
)
from transfer_sides import Remote, Role

from kvferry.staging.plan import plan_head_transfers
from kvferry.transport.bootstrap import BootstrapServer

GPU_TLS, CPU_TLS = "cuda_ipc,cuda_copy,tcp,sm,self", "tcp,sm,self"


def run_mode(args, mode: str, tokens: int) -> dict:
    """GB/s and messages per request of `mode` over args.requests requests (after a warm-up)."""
    server = BootstrapServer(args.src_tp)
    prefill = Role("prefill", args, mode, server.address, server.token)
    decode = Role("decode", args, mode, server.address)
    try:
        rates, messages, timelines, warm = [], [], [], {}
        for i in range(args.requests + 1):
            room = 1000 + i
            before = decode("open", room, tokens)
            began, began_wall = prefill("send", room, tokens)
            ended, msgs, nbytes, marks = decode("wait", room)
            if i:  # the first request warms up endpoints, kernels and the ring
                rates.append((nbytes - before[1]) / (ended - began) / 1e9)
                messages.append(msgs - before[0])
                timeline = {stage: (at - began_wall) * 1e3 for stage, at in marks.items()}
                timeline["kv_in_cache"] = (ended - began) * 1e3
                timelines.append(timeline)
            else:
                warm = {"prefill": prefill("stats"), "decode": decode("stats")}
        phases = {"prefill": prefill("stats"), "decode": decode("stats")}
        sent = sum(messages)  # data messages the decode side received
        return {
            "phases_s": phases,
            # transfer-thread CPU per data message after the warm-up, each side's ranks summed
            "cpu_us_per_message": {
                side: (phases[side]["transfer_cpu_s"] - warm[side]["transfer_cpu_s"]) / sent * 1e6
                for side in phases
            },
            # of which the loop's wait (poll, re-taking the GIL) and UCX's progress/arm calls
            "cpu_parts_us_per_message": {
                side: {
                    part: (phases[side][f"{part}_cpu_s"] - warm[side][f"{part}_cpu_s"]) / sent * 1e6
                    for part in ("wait", "ucx")
                }
                for side in phases
            },
            # ms after the hand-over at which each stage ended (the last message's, for the
            # stages every message passes), median over the requests
            "stages_ms": stage_times(timelines, statistics.median),
            "mode": mode,
            "tokens": tokens,
            "gbps": float(np.median(rates)),
            "messages_per_request": int(np.median(messages)),
            "request_mib": (nbytes - before[1]) / 2**20,
        }
    finally:
        decode.close()
        prefill.close()
        server.close()


def run_raw(args, nbytes_per_rank: int) -> dict:
    # bare UCX workers in two processes, whatever the layout: no agents, no bootstrap
    sender = Remote("prefill", args, "staged", [], "none")
    receiver = Remote("decode", args, "staged", [], "none")
    sender.receive(), receiver.receive()  # built
    try:
        rates = []
        sender("raw_open", nbytes_per_rank)
        address = receiver("raw_open", nbytes_per_rank)
        for i in range(args.requests + 1):
            receiver.ask("raw_recv")
            began = sender("raw_send", address)
            ended = receiver.receive()
            if i:
                rates.append(nbytes_per_rank * args.dst_tp / (ended - began) / 1e9)
        return {"mode": "raw", "gbps": float(np.median(rates)), "messages_per_request": args.dst_tp}
    finally:
        receiver.close()
        sender.close()


def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--layers", type=int, default=32 if gpu else 8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8192 if gpu else 1024)
    p.add_argument(
        "--slice-tokens", type=int, default=256 if gpu else 64, help="0 skips slice mode"
    )
    p.add_argument("--chunk", type=int, default=1024 if gpu else 256)
    p.add_argument("--src-tp", type=int, default=2)
    p.add_argument("--dst-tp", type=int, default=1)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--staging-mib", type=int, default=512 if gpu else 64)
    p.add_argument(
        "--tls", default=None, help=f"UCX_TLS (default {GPU_TLS!r} on GPU, {CPU_TLS!r} on CPU)"
    )
    p.add_argument("--raw-mib", type=int, default=1024, help="largest raw message per decode rank")
    add_layout_argument(p)
    add_data_path_argument(p)
    add_profile_argument(p)
    add_message_size_argument(p)
    p.add_argument(
        "--together-mib",
        type=int,
        default=None,
        help="also run the first data path with the decode ranks taking messages of several "
        "chunks up to this (transfer.max_message_bytes), side by side (default: a quarter of "
        "the ring; 0: no such run)",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    args.tls = args.tls or (GPU_TLS if args.device.startswith("cuda") else CPU_TLS)
    max_message_bytes(args)
    if args.together_mib is None:
        args.together_mib = args.staging_mib // 4
    return args


def main() -> None:
    args = parse_args()
    runs, raw, sliced = measure(args)
    staged = next(iter(runs.values()))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    shape = f"{args.layers} layers x {args.heads} KV heads x {args.head_dim} {args.dtype}"
    print(
        f"device: {device}; UCX_TLS={args.tls}; prefill TP{args.src_tp} -> decode "
        f"TP{args.dst_tp}; {shape}; chunk {args.chunk}"
    )
    print_table(args, runs, raw, sliced)
    print_details(args, runs)
    if args.json:
        with open(args.json, "w") as f:
            result = {"device": device, "args": vars(args), "rows": [raw, staged, sliced]}
            for first, other in PAIRS.values():
                if first in runs and other in runs:
                    result[f"{other}_path"] = runs[other]
            if "together" in runs:
                result["together"] = runs["together"]
            json.dump(result, f, indent=1)


def measure(args) -> tuple[dict[str, dict], dict, dict]:
    """The staged runs by data path (and "together"), the raw run and the slice run (a row of
    NaN where --slice-tokens is 0)."""
    runs = {}
    for path in data_paths(args):
        use_data_path(args, path)
        runs[path] = run_mode(args, "staged", args.tokens) | {"path": path}
    staged = next(iter(runs.values()))
    use_data_path(args, staged["path"])
    if args.together_mib:  # the comparison: chunks ready together travel as one message
        limit, args.max_message_bytes = args.max_message_bytes, args.together_mib << 20
        runs["together"] = run_mode(args, "staged", args.tokens) | {"path": "together"}
        args.max_message_bytes = limit
    per_rank = int(staged["request_mib"] * 2**20) // args.dst_tp
    raw = run_raw(args, min(per_rank, args.raw_mib << 20))
    sliced = run_mode(args, "slice", args.slice_tokens) if args.slice_tokens else None
    sliced = sliced or {
        "mode": "slice",
        "gbps": float("nan"),
        "messages_per_request": 0,
        "tokens": 0,
    }
    return runs, raw, sliced


def print_table(args, runs: dict[str, dict], raw: dict, sliced: dict) -> None:
    staged = next(iter(runs.values()))
    titles = ("mode", "tokens", "MiB/req", "GB/s", "msgs/req", "vs raw", "vs slice")
    widths = ("<10", ">8", ">10", ">9", ">10", ">8", ">10")
    print("".join(f"{t:{w}}" for t, w in zip(titles, widths, strict=True)))
    for row in (raw, *runs.values(), sliced):
        tokens = row.get("tokens", args.tokens)
        mib = row.get("request_mib", staged["request_mib"])
        mode = row["mode"] if row["mode"] != "staged" else f"{row['path']}"
        print(
            f"{mode:<10}{tokens:>8}{mib:>10.1f}{row['gbps']:>9.2f}"
            f"{row['messages_per_request']:>10}"
            f"{row['gbps'] / raw['gbps']:>8.2f}{row['gbps'] / sliced['gbps']:>10.1f}"
        )


def print_details(args, runs: dict[str, dict]) -> None:
    staged = next(iter(runs.values()))
    chunks = -(-args.tokens // args.chunk)
    pairs = len(plan_head_transfers(args.heads, args.src_tp, args.dst_tp))
    print(
        f"staged messages per request {staged['messages_per_request']} "
        f"(chunks x writer-reader pairs = {chunks} x {pairs})"
    )
    print(
        "summed seconds over all requests (copy = gather or scatter, wire = send or receive):",
        json.dumps(staged["phases_s"]),
    )
    for run in runs.values():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in run["stages_ms"].items())
        print(f"staged, {run['path']} path, ms after the hand-over (median): {stages}")
        cpu = run["cpu_us_per_message"]
        print(
            f"  transfer-thread CPU per message (after the warm-up): prefill "
            f"{cpu['prefill']:.0f} us, decode {cpu['decode']:.0f} us; of which waiting (poll, "
            f"GIL) and in UCX: {json.dumps(run['cpu_parts_us_per_message'])}"
        )
    if "together" in runs:
        together = runs["together"]
        print(
            f"chunks ready together in one message of up to {args.together_mib} MiB / the "
            f"first run: {together['gbps'] / staged['gbps']:.2f}x the GB/s "
            f"({together['messages_per_request']} vs {staged['messages_per_request']} messages "
            "per request)"
        )
    for first, other in PAIRS.values():
        if first in runs and other in runs:
            mine, them = runs[first], runs[other]
            cpu = [mine["cpu_us_per_message"][s] / them["cpu_us_per_message"][s]
                   for s in ("prefill", "decode")]  # fmt: skip
            print(
                f"{first} / {other} data path: {mine['gbps'] / them['gbps']:.2f}x the GB/s, "
                f"{cpu[0]:.2f}x / {cpu[1]:.2f}x the prefill / decode CPU per message"
            )


if __name__ == "__main__":
    main()
