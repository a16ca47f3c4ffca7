"""The engine alone on one device, no transfers: how close a decode step comes to the memory
floor, eager against CUDA graphs, and what the paged prefill kernel costs against torch SDPA
over contiguous K/V.

    python bench/engine.py                   # on a GPU: the decode daemon's model of
                                             # deploy/h200-llama8b.yaml (Llama-3-8B shapes)
    python bench/engine.py --quick           # the embedded tiny model, small sizes (a smoke run)

Decode: a step is `ModelRunner.forward` (host inputs, upload, forward) plus the greedy argmax,
steps queued back to back as the engine queues them; its time is the wall time of many steps
over their count. The floor is the bytes a step must read — every weight but the embedding
table, and each sequence's K/V — over the device's measured copy bandwidth (bytes read +
written per second of a large copy). Prefill: one forward over a whole prompt, the paged
kernel against the same forward with torch SDPA over the same K/V laid out contiguously.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import Work
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import random_weights
from kvferry.daemon.server.config import ModelSection

ROOT = Path(__file__).resolve().parent.parent
PAGE = 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--deploy", default=str(ROOT / "deploy" / "h200-llama8b.yaml"))
    p.add_argument("--batches", default="1,8,32,128", help="none: no decode points")
    p.add_argument("--contexts", default="1024,8192")
    p.add_argument("--prompts", default="2048,8192")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per point")
    p.add_argument("--quick", action="store_true", help="the tiny embedded model, small sizes")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.batches, args.contexts, args.prompts, args.steps = "1,4", "64,256", "128", 5
    for name in ("batches", "contexts", "prompts"):
        values = getattr(args, name)
        setattr(args, name, [] if values == "none" else [int(v) for v in values.split(",")])
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def load_model(args) -> Model:
    section = ModelSection()
    if not args.quick:
        daemons = yaml.safe_load(Path(args.deploy).read_text())["daemons"]
        decode = next(d for d in daemons if d["role"] == "decode")
        section = ModelSection(**decode.get("model", {}))
    config = section.model_config()
    began = time.perf_counter()
    weights = random_weights(config, section.seed)
    model = Model(config, weights, dtype=getattr(torch, section.dtype), device=args.device)
    shape = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {section.dtype}"
    print(f"model {section.name}: {shape}, built in {time.perf_counter() - began:.0f} s")
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 1 GiB device copy (the kernels bench's roofline)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    began, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - began)


def weight_bytes(model: Model) -> int:
    """Bytes a decode step reads from the weights: all but the embedding table (a row per
    token), which it reads in full only as a tied lm_head."""
    seen, total = set(), 0
    for name, tensor in model.w.items():
        if name == "model.embed_tokens.weight" or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def kv_bytes_per_token(model: Model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * model.local_kv * c.head_dim * model.dtype.itemsize


def time_steps(runner: ModelRunner, batch: list[Work], steps: int, device: str) -> float:
    """Seconds per decode step, steps queued back to back."""
    for _ in range(3):
        runner.forward(batch).argmax(-1)
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        runner.forward(batch).argmax(-1)
    sync(device)
    return (time.perf_counter() - began) / steps


def decode_rows(model: Model, args, bandwidth: float) -> list[dict]:
    per_token = kv_bytes_per_token(model)
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else 8 << 30
    room = int(free * 0.7) // per_token  # tokens of KV that fit beside the step's activations
    if not args.batches:
        return []
    wanted = max(b * c for b in args.batches for c in args.contexts)
    pages = -(-min(room, wanted) // PAGE) + max(args.batches)
    blocks = BlockManager(pages, PAGE)
    graphed = args.device == "cuda"
    runner = ModelRunner(model, blocks, graph_batch=max(args.batches) if graphed else 0)
    graphs, rows = runner.graphs, []
    weights = weight_bytes(model)
    for batch_size in args.batches:
        for context in args.contexts:
            row = {"batch": batch_size, "context": context}
            rows.append(row)
            if batch_size * -(-context // PAGE) > pages:
                row["skipped"] = f"{batch_size * context * per_token / 2**30:.0f} GiB of KV"
                print(f"decode batch {batch_size:4d} context {context:6d}: skipped, "
                      f"{row['skipped']} does not fit", flush=True)  # fmt: skip
                continue
            seqs = [Sequence(list(np.arange(context) % 250), SamplingParams()) for _ in
                    range(batch_size)]  # fmt: skip
            batch = []
            for seq in seqs:
                blocks.allocate(seq.id, context)
                batch.append(Work(seq, context - 1, 1))
            runner.graphs = None
            row["eager_ms"] = 1e3 * time_steps(runner, batch, args.steps, args.device)
            runner.graphs = graphs
            if graphs is not None:
                row["graph_ms"] = 1e3 * time_steps(runner, batch, args.steps, args.device)
            row["floor_ms"] = 1e3 * (weights + batch_size * context * per_token) / bandwidth
            best = row.get("graph_ms", row["eager_ms"])
            row["graph_vs_eager"] = row["eager_ms"] / best
            row["vs_floor"] = best / row["floor_ms"]
            print(f"decode batch {batch_size:4d} context {context:6d}: eager {row['eager_ms']:7.2f}"
                  f" ms, graphs {row.get('graph_ms', float('nan')):7.2f} ms "
                  f"({row['graph_vs_eager']:.2f}x), floor {row['floor_ms']:6.2f} ms, "
                  f"{row['vs_floor']:.2f}x the floor", flush=True)  # fmt: skip
            for seq in seqs:
                blocks.deallocate(seq.id)
    return rows


class ContiguousSdpa:
    """The model's ops with attention by torch SDPA's flash kernel over K/V read as one
    contiguous run of slots (the prompt's pages are allocated in order from page 0)."""

    def __init__(self, ops) -> None:
        self.ops, self.backend = ops, "flash, GQA in the kernel"

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def attend(self, q, k_cache, v_cache, forward):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        n = q.shape[0]
        q = q.transpose(0, 1)[None]  # [1, Hq, n, D]
        k, v = (c[:n].transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, Hkv, n, D]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:  # no GQA in this build's flash kernel: heads repeated first
                self.backend = "flash, K/V heads repeated"
                groups = q.shape[1] // k.shape[1]
                k, v = (t.repeat_interleave(groups, 1) for t in (k, v))
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o[0].transpose(0, 1).reshape(n, -1)


@contextmanager
def swapped_ops(model: Model, ops):
    saved, model.ops = model.ops, ops
    try:
        yield ops
    finally:
        model.ops = saved


def prefill_rows(model: Model, args) -> list[dict]:
    rows = []
    for prompt in args.prompts:
        blocks = BlockManager(-(-prompt // PAGE), PAGE)
        runner = ModelRunner(model, blocks)
        seq = Sequence(list(np.arange(prompt) % 250), SamplingParams())
        blocks.allocate(seq.id, prompt)  # pages 0, 1, 2, ...: contiguous slots
        batch, row = [Work(seq, 0, prompt)], {"prompt": prompt}
        row["paged_tok_s"] = prompt / time_steps(runner, batch, 3, args.device)
        with swapped_ops(model, ContiguousSdpa(model.ops)) as sdpa:
            row["sdpa_tok_s"] = prompt / time_steps(runner, batch, 3, args.device)
            row["sdpa_backend"] = sdpa.backend
        row["paged_vs_sdpa"] = row["paged_tok_s"] / row["sdpa_tok_s"]
        print(f"prefill {prompt:6d} tokens: paged {row['paged_tok_s']:9.0f} tok/s, SDPA "
              f"{row['sdpa_tok_s']:9.0f} tok/s ({row['sdpa_backend']}): "
              f"{row['paged_vs_sdpa']:.2f}x", flush=True)  # fmt: skip
        rows.append(row)
        del runner
    return rows


def main() -> None:
    args = parse_args()
    model = load_model(args)
    bandwidth = copy_bandwidth(args.device)
    print(f"device {args.device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)")
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "copy_gbps": bandwidth / 1e9,
        "weight_bytes": weight_bytes(model),
        "decode": decode_rows(model, args, bandwidth),
    }
    if args.device == "cuda":
        torch.cuda.empty_cache()
    result["prefill"] = prefill_rows(model, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
