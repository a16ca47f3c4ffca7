"""TP ranks sharing one GPU: a forward's all-reduces ordered by interprocess CUDA events against
one host sync per call (and against gloo's), side by side.

    python bench/device_reduce.py                     # 2 ranks, one-gpu.yaml's and 8B's shapes
    python bench/device_reduce.py --json out.json
    python bench/device_reduce.py --mps               # then again on a private MPS server

Each rank runs --layers "layers" the way the model does between two all-reduces: a half-layer
of matmuls on its own slice (--matmuls of [tokens, hidden] x [hidden, hidden / tp]-like work),
then the all-reduce of the [tokens, hidden] activations, twice a layer. Timed: wall ms per
forward on rank 0, from the first launch to the device done (median of --rounds), for
`SharedDeviceAllReduce(ordering="events")` (the daemons' default), `ordering="host"` (a
device sync before each barrier) and gloo's all-reduce of the CUDA tensor; and the floor, the
same work with no all-reduce (the ranks' processes still share the GPU, which runs one
process's kernels at a time). The ranks meet over the pipes a daemon gives them
(daemon/engine/links.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvferry.daemon.cli.mps import NoMPS, mps_server, print_log
from kvferry.daemon.engine.links import Links, close_links, make_links
from kvferry.daemon.model.shared_reduce import SharedDeviceAllReduce

SHAPES = {"one-gpu.yaml (hidden 1024)": (512, 1024, 16), "8B (hidden 4096)": (2048, 4096, 32)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--matmuls", type=int, default=4, help="matmuls per half-layer")
    p.add_argument("--forwards", type=int, default=10, help="forwards per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--mps", action="store_true",
        help="then run it all again on a private CUDA MPS server (bench/mps.py) and compare",
    )  # fmt: skip
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args()


def forward(x, weights, layers: int, reduce, scale: float) -> None:
    for _ in range(2 * layers):
        h = x
        for w in weights:
            h = h @ w
        torch.mul(h, scale, out=x)  # the sum keeps its size
        reduce(x)


def rank_main(rank: int, args, port: int, ends, out) -> None:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp
    )
    barrier = Links(rank, ends[rank], 60.0).barrier
    for shape, (tokens, hidden, layers) in SHAPES.items():
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16) * 0.01
        weights = [torch.eye(hidden, device=device, dtype=torch.bfloat16)] * args.matmuls
        reducers = {
            ordering: SharedDeviceAllReduce(
                dist.group.WORLD, rank, args.tp, device, x.numel(), x.dtype, barrier, ordering
            )
            for ordering in ("events", "host")
        }
        reducers["gloo"] = functools.partial(dist.all_reduce, group=dist.group.WORLD)
        reducers["none"] = _no_reduce
        for name, reduce in reducers.items():
            forward(x, weights, layers, reduce, 1 / args.tp)  # warm-up
            torch.cuda.synchronize()
            samples = []
            for _ in range(args.rounds):
                barrier()
                began = time.perf_counter()
                for _ in range(args.forwards):
                    forward(x, weights, layers, reduce, 1 / args.tp)
                torch.cuda.synchronize()
                samples.append((time.perf_counter() - began) / args.forwards * 1e3)
            if rank == 0:
                out[f"{shape}|{name}"] = statistics.median(samples)
        barrier()  # the other ranks map this rank's buffers until they are done
    dist.destroy_process_group()


def _no_reduce(x: torch.Tensor) -> None:
    """The floor: the work between the all-reduces alone."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args) -> dict[str, dict]:
    """One run of the rank processes: shape -> its figures (and their table printed)."""
    ctx = mp.get_context("spawn")
    ends = make_links(ctx, args.tp)
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            rank_main, (args, free_port(), ends, out), nprocs=args.tp, start_method="spawn"
        )
        results = dict(out)
    close_links(ends)
    print(f"{'shape':28}{'events':>10}{'host sync':>11}{'gloo':>10}{'none':>8}"
          f"{'host / events':>15}{'events / none':>15}")  # fmt: skip
    rows = {}
    for shape in SHAPES:
        events, host, gloo, none = (
            results[f"{shape}|{n}"] for n in ("events", "host", "gloo", "none")
        )
        rows[shape] = {
            "events_ms": events, "host_ms": host, "gloo_ms": gloo, "none_ms": none,
            "host_over_events": host / events, "events_over_none": events / none,
        }  # fmt: skip
        print(f"{shape:28}{events:10.2f}{host:11.2f}{gloo:10.2f}{none:8.2f}"
              f"{host / events:14.2f}x{events / none:14.2f}x")  # fmt: skip
    return rows


def measure_with_mps(args) -> tuple[dict | None, str]:
    """The same run with the ranks on a private MPS server: (rows, "") or (None, why not)."""
    try:
        with mps_server() as env:
            saved = dict(os.environ)
            os.environ.update(env)  # the spawned ranks inherit it
            try:
                return measure(args), ""
            except Exception:
                print_log(env)
                raise
            finally:
                os.environ.clear()
                os.environ.update(saved)
    except NoMPS as exc:
        return None, str(exc)


def main() -> None:
    args = parse_args()
    print(f"{args.tp} ranks on one GPU, {args.matmuls} matmuls a half-layer: wall ms per forward")
    result = {"args": vars(args), "shapes": measure(args)}
    if args.mps:
        print("the same on a private MPS server (the ranks' kernels side by side):")
        mps, why = measure_with_mps(args)
        result["mps"], result["mps_note"] = mps, why
        if mps is None:
            print(f"  no MPS here: {why}")
        for shape, row in (mps or {}).items():
            ratio = result["shapes"][shape]["events_ms"] / row["events_ms"]
            row["events_time_sliced_over_mps"] = ratio
            print(f"{shape:28} events: time-sliced / MPS {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
