"""Gather/scatter bandwidth beside the copy roofline and a per-layer torch-indexing gather.

    python bench/copy_kernels.py                     # GPU defaults: 80 layers, 8 KV heads, bf16
    python bench/copy_kernels.py --tokens 4096,32768 --fractions 8,1 --json out.json

Every figure counts bytes read + written. The roofline is one large device-to-device copy
measured in the same run ("%roof"); "%copy" compares with a plain copy of the same number of
bytes, which pays the same launch and tail costs as the gather. Two per-layer torch gathers are
the comparison: "isel" is kvferry's own torch path (index_select straight into staging,
backend="torch"), "naive" the usual advanced-indexing copy `staging[p] = cache[p][slots, h0:h1]`.
"host us" is what issuing one gather costs the calling thread; GB/s figures are device time,
measured with the calls queued behind a sleep kernel so host overhead does not hide in them.
On a CPU the same comparison runs at small sizes, the native host copies (staging/host_copy.c)
in the kernels' columns, for relative figures only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kvferry.staging.kv_copy import KVPlanes, gather, scatter
from kvferry.staging.slots import token_slots


def timed(fn, iters: int, device: torch.device) -> tuple[float, float]:
    """(device seconds, host seconds) per call, after one warm-up call.

    Host seconds is what issuing the call costs the calling thread. On a GPU the device is first
    held busy by a sleep kernel while the calls are queued, so device seconds measure the
    kernels back to back, not how fast one Python thread can issue them.
    """
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(HOLD_CYCLES)
        begin = time.perf_counter()
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        host = time.perf_counter() - begin
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters, host / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = (time.perf_counter() - begin) / iters
    return elapsed, elapsed


HOLD_CYCLES = 100_000_000  # ~50 ms of GPU clock: longer than issuing any timed loop


def copy_roofline(device: torch.device, nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), iters, device)[0] / 1e9


def naive_gather(planes: KVPlanes, slots: np.ndarray, head_start: int, num_heads: int, out):
    """What a per-layer gather written with torch advanced indexing does."""
    index = torch.from_numpy(slots).to(planes.device)
    staged = out.view(planes.dtype).view(planes.staging_shape(len(slots), num_heads))
    for plane, dst in zip(planes.planes, staged, strict=True):
        dst.copy_(plane[index, head_start : head_start + num_heads])


def paged_slots(num_tokens: int, page_size: int, num_pages: int, rng) -> np.ndarray:
    pages = rng.permutation(num_pages)[: -(-num_tokens // page_size)]
    return token_slots(pages, page_size, 0, num_tokens)


def measure(args, device, cache, target, roofline, tokens, fraction, rng) -> dict:
    planes, dst_planes = KVPlanes.from_cache(cache), KVPlanes.from_cache(target)
    num_heads = max(1, args.heads // fraction)
    head_start = num_heads % args.heads  # a middle rank's slice where there is one
    slots = paged_slots(tokens, args.page_size, planes.num_slots // args.page_size, rng)
    dst_slots = paged_slots(tokens, args.page_size, planes.num_slots // args.page_size, rng)
    nbytes = planes.staging_bytes(tokens, num_heads)
    staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
    check = torch.empty_like(staging)
    fast = "cuda" if device.type == "cuda" else "auto"  # on a CPU: host_copy.c if it builds
    few = max(2, args.iters // 4)
    t_gather, host_gather = timed(
        lambda: gather(planes, slots, head_start, num_heads, staging, fast), args.iters, device
    )
    t_scatter, _ = timed(
        lambda: scatter(staging, dst_planes, dst_slots, 0, num_heads, fast), args.iters, device
    )
    t_torch, _ = timed(
        lambda: gather(planes, slots, head_start, num_heads, check, "torch"), few, device
    )
    assert torch.equal(staging, check), "kernel and index_select gathers differ"
    t_naive, _ = timed(
        lambda: naive_gather(planes, slots, head_start, num_heads, check), few, device
    )
    assert torch.equal(staging, check), "kernel and advanced-indexing gathers differ"
    t_copy, _ = timed(lambda: check.copy_(staging), args.iters, device)  # same bytes, contiguous
    gbps = lambda seconds: 2 * nbytes / seconds / 1e9  # noqa: E731
    return {
        "tokens": tokens,
        "heads": num_heads,
        "mib": nbytes / 2**20,
        "gather_gbps": gbps(t_gather),
        "scatter_gbps": gbps(t_scatter),
        "torch_gbps": gbps(t_torch),
        "gather_vs_roofline": gbps(t_gather) / roofline,
        "scatter_vs_roofline": gbps(t_scatter) / roofline,
        "same_size_copy_gbps": gbps(t_copy),
        "gather_vs_same_size_copy": t_copy / t_gather,
        "gather_vs_torch": t_torch / t_gather,
        "naive_gbps": gbps(t_naive),
        "gather_vs_naive": t_naive / t_gather,
        "gather_us": t_gather * 1e6,
        "launch_host_us": host_gather * 1e6,
    }


COLUMNS = [  # title, width, formatter
    ("tokens", 7, lambda r: f"{r['tokens']}"),
    ("heads", 6, lambda r: f"{r['heads']}"),
    ("MiB", 8, lambda r: f"{r['mib']:.0f}"),
    ("gather GB/s", 13, lambda r: f"{r['gather_gbps']:.0f}"),
    ("%roof", 7, lambda r: f"{100 * r['gather_vs_roofline']:.0f}%"),
    ("%copy", 7, lambda r: f"{100 * r['gather_vs_same_size_copy']:.0f}%"),
    ("scatter GB/s", 14, lambda r: f"{r['scatter_gbps']:.0f}"),
    ("%roof", 7, lambda r: f"{100 * r['scatter_vs_roofline']:.0f}%"),
    ("isel GB/s", 11, lambda r: f"{r['torch_gbps']:.0f}"),
    ("x isel", 8, lambda r: f"{r['gather_vs_torch']:.1f}"),
    ("naive GB/s", 12, lambda r: f"{r['naive_gbps']:.0f}"),
    ("x naive", 9, lambda r: f"{r['gather_vs_naive']:.1f}"),
    ("host us", 9, lambda r: f"{r['launch_host_us']:.0f}"),
]


def parse_args():
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=80 if gpu else 8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--tokens", default="4096,8192,16384,32768" if gpu else "512,2048")
    parser.add_argument(
        "--fractions", default="8,4,2,1", help="head fractions as denominators: 8 = 1/8 of heads"
    )
    parser.add_argument("--iters", type=int, default=20 if gpu else 5)
    parser.add_argument("--json", help="write the rows here as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    token_list = [int(t) for t in args.tokens.split(",")]
    dtype = getattr(torch, args.dtype)
    pages = -(-max(token_list) // args.page_size) * 5 // 4  # a quarter spare, to shuffle among
    shape = (2 * args.layers, pages * args.page_size, args.heads, args.head_dim)
    cache = torch.randn(shape, device=device, dtype=dtype)
    target = torch.zeros_like(cache)
    roofline = copy_roofline(device, min(4 << 30, cache.numel() * cache.element_size()), args.iters)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; copy roofline {roofline:.0f} GB/s (read + write)")
    print(
        f"cache: {args.layers} layers x K,V x {args.heads} heads x {args.head_dim} {args.dtype},"
        f" page {args.page_size}"
    )
    print("".join(f"{title:>{width}}" for title, width, _ in COLUMNS))
    rows, rng = [], np.random.default_rng(0)
    for tokens in token_list:
        for fraction in (int(f) for f in args.fractions.split(",")):
            row = measure(args, device, cache, target, roofline, tokens, fraction, rng)
            rows.append(row)
            print("".join(f"{fmt(row):>{width}}" for _, width, fmt in COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "roofline_gbps": roofline, "args": vars(args), "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
