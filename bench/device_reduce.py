"""TP ranks sharing one GPU: a forward's all-reduces ordered by interprocess CUDA events against
one host sync per call (and against gloo's), side by side; on an MPS server also ordered by
barrier kernels inside the streams, eagerly and the whole forward as one CUDA graph.

    python bench/device_reduce.py                     # 2 ranks, one-gpu.yaml's and 8B's shapes
    python bench/device_reduce.py --json out.json
    python bench/device_reduce.py --mps               # then again on a private MPS server

Each rank runs --layers "layers" the way the model does between two all-reduces: a half-layer
of matmuls on its own slice (--matmuls of [tokens, hidden] x [hidden, hidden / tp]-like work),
then the all-reduce of the [tokens, hidden] activations, twice a layer. Timed: wall ms per
forward on rank 0, from the first launch to the device done (median of --rounds), for
`SharedDeviceAllReduce(ordering="events")` (the daemons' choice where the GPU takes the
processes in turns), `ordering="host"` (a device sync before each barrier), gloo's all-reduce of
the CUDA tensor and, on an MPS server (`--mps`), `ordering="device"` (the daemons' choice there:
barrier kernels) eagerly and as a CUDA graph's replay (`device graph`); and the floor, the
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
        orderings = ("events", "host") + (("device",) if on_mps() else ())
        reducers = {
            ordering: SharedDeviceAllReduce(
                dist.group.WORLD, rank, args.tp, device, x.numel(), x.dtype, barrier, ordering
            )
            for ordering in orderings
        }
        reducers["gloo"] = functools.partial(dist.all_reduce, group=dist.group.WORLD)
        reducers["none"] = _no_reduce
        runs = {name: functools.partial(forward, x, weights, layers, reduce, 1 / args.tp)
                for name, reduce in reducers.items()}  # fmt: skip
        if "device" in reducers:  # the whole forward as one CUDA graph
            runs["device graph"] = captured(runs["device"])
        for name, run in runs.items():
            run()  # warm-up
            torch.cuda.synchronize()
            samples = []
            for _ in range(args.rounds):
                barrier()
                began = time.perf_counter()
                for _ in range(args.forwards):
                    run()
                torch.cuda.synchronize()
                samples.append((time.perf_counter() - began) / args.forwards * 1e3)
            if rank == 0:
                out[f"{shape}|{name}"] = statistics.median(samples)
        barrier()  # the other ranks map this rank's buffers until they are done
    dist.destroy_process_group()


def on_mps() -> bool:
    """Whether this process runs on an MPS server (then the ranks can meet on the device)."""
    return bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))


def captured(run):
    """`run` (after a warm-up) as a CUDA graph's replay."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


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
    names = ["events", "host", "gloo", "none", "device", "device graph"]
    names = [n for n in names if f"{next(iter(SHAPES))}|{n}" in results]
    print(f"{'shape':28}" + "".join(f"{n:>14}" for n in names) + f"{'host / events':>15}"
          f"{'events / none':>15}{'events / device graph':>23}")  # fmt: skip
    rows = {}
    for shape in SHAPES:
        ms = {n: results[f"{shape}|{n}"] for n in names}
        row = {f"{n.replace(' ', '_')}_ms": v for n, v in ms.items()}
        row["host_over_events"] = ms["host"] / ms["events"]
        row["events_over_none"] = ms["events"] / ms["none"]
        graphs = ""
        if "device graph" in ms:
            row["events_over_device_graph"] = ms["events"] / ms["device graph"]
            graphs = f"{row['events_over_device_graph']:22.2f}x"
        rows[shape] = row
        ratios = f"{row['host_over_events']:14.2f}x{row['events_over_none']:14.2f}x{graphs}"
        print(f"{shape:28}" + "".join(f"{v:14.2f}" for v in ms.values()) + ratios)
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
