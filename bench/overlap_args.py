"""bench/overlap.py's arguments (bench/hops.py takes the same)."""

from __future__ import annotations

import argparse

import torch
from bench_model import add_model_args  # bench/ is on sys.path as a script


def parse_args(description: str) -> argparse.Namespace:
    """The arguments; `description`: the help's text (bench/overlap.py's docstring)."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p, gpu)
    p.add_argument("--prompt", type=int, default=2048 if gpu else 256, help="tokens per prompt")
    p.add_argument(
        "--chunk",
        type=int,
        default=512 if gpu else 64,
        help="tokens per prefill forward (prefill_chunk_tokens) and per transfer chunk",
    )
    p.add_argument("--layer-group", type=int, default=4 if gpu else 1)
    p.add_argument(
        "--uniform",
        action="store_true",
        help="also run layer-wise with every group --layer-group layers (transfer.layer_taper: "
        "false), against the default whose last group is split in halves down to one layer",
    )
    p.add_argument(
        "--staging-chunks",
        type=int,
        default=None,
        help="each side's staging ring, in chunks' KV (the throughput batch's chunks wait for "
        "ring room beyond this); default: what a prefill daemon sizes it to, one forward's KV",
    )
    p.add_argument("--requests", type=int, default=16 if gpu else 4, help="throughput batch")
    p.add_argument("--repeats", type=int, default=5 if gpu else 3, help="latency samples")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument(
        "--decode-process",
        action="store_true",
        help="run the decode agent in a process of its own (no GIL shared with the prefill "
        "engine, as in a deployment; on one GPU the two processes then time-slice it)",
    )
    p.add_argument(
        "--held",
        action="store_true",
        help="also run whole-chunk with each prompt held until its room is registered, and "
        "print whole-chunk's TTFT over it",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="launch every prefill forward eagerly (default on a GPU: replays of its CUDA "
        "graphs, as the daemons do, engine/prefill_graphs.py)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="the decode agent posts each receive once its message has come (a probe, a turn), "
        "not as the room registers, as it does by default with the cache on a GPU "
        "(transfer.post_receives_ahead: false)",
    )
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args()
