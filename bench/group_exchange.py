"""What a TP group's per-step exchanges cost between the processes of one host: a gloo group
against the pipes between a daemon's ranks (daemon/engine/links.py), side by side.

    python bench/group_exchange.py                # 2 ranks
    python bench/group_exchange.py --tp 4 --json out.json

Every rank of a prefill or decode daemon with tp > 1 runs, at each engine step, a broadcast of
the commands rank 0 took and a reduction of the ranks' views of their rooms; ranks that share a
GPU also meet at a barrier in each of a forward's all-reduces (two a layer), and ranks on CPUs
sum a layer's activations twice (gloo's all-reduce, or SharedHostAllReduce over the pipes).
Each is timed here both ways, wall µs per call on rank 0 (median of --rounds rounds of --calls
calls).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvferry.daemon.engine.group import TPGroup
from kvferry.daemon.engine.links import Links, make_links
from kvferry.daemon.model.shared_reduce import SharedHostAllReduce
from kvferry.transport.room import KVPoll


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tp", type=int, default=2, help="ranks in the group")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rooms", type=int, default=32, help="rooms in each reduction")
    p.add_argument("--prompt", type=int, default=2048, help="tokens of the broadcast prompt")
    p.add_argument("--tokens", type=int, default=128, help="activation rows of the all-reduce")
    p.add_argument("--hidden", type=int, default=576, help="activation width (SmolLM2-135M)")
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args()


def operations(group: TPGroup, args) -> dict:
    """name -> one call of it on `group` (the same on every rank)."""
    states = [KVPoll.Transferring] * args.rooms
    prompt = [{"room": 7, "prompt": list(range(args.prompt))}] if group.leader else None
    x = torch.zeros(args.tokens, args.hidden)
    if group.links is None:
        reduce = functools.partial(dist.all_reduce, group=group.process_group)
    else:
        reduce = SharedHostAllReduce(group, x.numel(), x.dtype)
    return {
        "barrier": group.barrier,
        "broadcast, no commands": lambda: group.broadcast([] if group.leader else None),
        f"broadcast, a {args.prompt}-token prompt": lambda: group.broadcast(prompt),
        f"verdicts of {args.rooms} rooms": lambda: group.verdicts(states),
        f"all-reduce, [{args.tokens}, {args.hidden}] fp32": lambda: reduce(x),
    }


def time_calls(fn, calls: int, rounds: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - began) / calls * 1e6)
    return statistics.median(samples)


def rank_main(rank: int, args, store: str, ends, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.tp)
    groups = {
        "gloo": TPGroup(args.tp, rank, dist.group.WORLD),
        "pipes": TPGroup(args.tp, rank, links=Links(rank, ends[rank], 60.0)),
    }
    for name, group in groups.items():
        for op, fn in operations(group, args).items():
            us = time_calls(fn, args.calls, args.rounds)
            if rank == 0:
                out[f"{op}|{name}"] = us
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    ctx = mp.get_context("spawn")
    ends = make_links(ctx, args.tp)
    with tempfile.TemporaryDirectory() as tmp, ctx.Manager() as manager:
        out = manager.dict()
        store = os.path.join(tmp, "store")
        spawned = (args, store, ends, out)
        mp.start_processes(rank_main, spawned, nprocs=args.tp, start_method="spawn")
        results = dict(out)
    print(f"{args.tp} ranks on this host: wall µs per call on rank 0 (median of {args.rounds})")
    print(f"{'operation':36}{'gloo':>10}{'pipes':>10}{'gloo / pipes':>14}")
    rows = {}
    for op in dict.fromkeys(key.split("|")[0] for key in results):
        gloo, pipes = results[f"{op}|gloo"], results[f"{op}|pipes"]
        rows[op] = {"gloo_us": gloo, "pipes_us": pipes, "ratio": gloo / pipes}
        print(f"{op:36}{gloo:10.1f}{pipes:10.1f}{gloo / pipes:13.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "operations": rows}, f, indent=1)


if __name__ == "__main__":
    main()
