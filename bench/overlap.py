"""Prefill with and without KV transfers, whole-chunk vs layer-wise, on one device.

    python bench/overlap.py                       # GPU if present, else a small CPU model
    python bench/overlap.py --prompt 4096 --chunk 1024 --layer-group 4 --json out.json

One process holds a prefill engine (random Llama-family model, paged KV cache, chunked prefill)
and a decode-side transfer agent with its own cache (`--decode-process`: the agent in a process
of its own), joined by UCX (cuda_ipc/cuda_copy on a GPU). Three ways to prefill the same
prompts, side by side:

- local:       the forwards and the first token only, nothing sent — what a colocated engine
               does before its first token;
- whole-chunk: kvferry's transfer, one message per chunk (gathered after the chunk's forward);
- layer-wise:  one message per `--layer-group` layers, each gathered as soon as the forward has
               written those layers, while the later layers still compute; the last group split
               in halves down to one layer (`transfer.layer_taper`; `--uniform`: also without);
- with `--held`, also whole-chunk with every prompt held until its room is registered (no
  `scheduler.unregistered_prefill_tokens`: the forward waits for the registration's trip, as
  every prompt did before prefill started on a prompt's arrival).

Latency: one request at a time; time from submission to the first token on the host (local)
or to the room's Success on the decode side (transfers: the first token there, and the KV
received with its scatter queued ahead of whatever the decode engine runs next, as the engine
admits it) — the time to first token of a colocated vs a disaggregated deployment, less HTTP
and scheduling. Throughput: --requests
prompts submitted at once; prompt tokens per second of forward work, and the ratio with
transfers running to without. The transfer runs' clock starts once the decode side has
registered every room, so that their prompts share the forwards as in the local run (started
earlier, the first forward takes the rooms registered by then and the batch splits into
smaller, slower forwards); registration is part of each latency figure.

Forward launch: each variant's host launch of one prompt's forward and draw, and this process's
transfer threads' turns and CPU meanwhile (Python taken from a host-bound launch).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import statistics
import time

import numpy as np
import torch
from bench_model import build_model
from decode_side import DecodeProcess, LocalDecode, Spec  # bench/ is on sys.path as a script
from overlap_args import parse_args
from timelines import Launch, stage_times

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.builder import EngineSettings, build_engine
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import PrefillScheduler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.daemon.model.llama import Model
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.config import TransferConfig, prefill_ring_bytes
from kvferry.transport.room import KVPoll

GPU_TLS, CPU_TLS = "cuda_ipc,cuda_copy,tcp,sm,self", "tcp,sm,self"
WAIT_S = 0.5  # the longest sleep without news (a lost ring would show as this)


class Bench:
    """The model, its prefill engine and the receiving side, for one transfer setting."""

    def __init__(
        self, args, model: Model, layer_group: int | None, held: bool = False, taper: bool = True
    ) -> None:
        """`held`: every prompt waits for its room's registration (else the daemons' default:
        up to one forward's tokens of prompts compute before it); `taper`: the layer groups'
        (`transfer.layer_taper`)."""
        self.args, self.model, self.taper = args, model, taper
        self.transfers = layer_group is not None
        self.next_room = itertools.count(1)
        self.timelines: list[dict[str, float]] = []  # per prompt sent: stage -> ms after submit
        self.launches: list[Launch] = []  # per forward: its host launch, the threads meanwhile
        pages = -(-args.prompt // args.page_size) * (args.requests + 1)
        if self.transfers:
            settings = EngineSettings(
                page_size=args.page_size,
                num_pages=pages,
                prefill_chunk_tokens=args.chunk,
                max_batch_tokens=args.chunk * args.requests,
                unregistered_prefill_tokens=0 if held else args.chunk * args.requests,
                cuda_graphs=not args.eager,
            )
            self._build_transfers(settings, layer_group)
        else:  # the forwards alone: no agent, no engine
            graphs = {} if args.eager else {"graph_tokens": args.chunk * args.requests}
            self.runner = ModelRunner(model, BlockManager(pages, args.page_size), **graphs)
            self.scheduler = PrefillScheduler(
                self.runner.blocks, args.chunk, args.chunk * args.requests
            )
        self.blocks = self.runner.blocks

    def _build_transfers(self, settings: EngineSettings, layer_group: int) -> None:
        """The prefill engine, and a decode agent receiving into a cache of its own (the prefill
        cache's planes, fewer slots)."""
        from kvferry.transport.ucx import UcxDataPlane

        args, model = self.args, self.model
        cfg, device = model.config, model.device
        slots = args.prompt * args.requests
        shape = (2 * cfg.num_hidden_layers, slots, model.local_kv, cfg.head_dim)
        token_bytes = shape[0] * shape[2] * shape[3] * model.dtype.itemsize  # all planes
        tls = GPU_TLS if device.type == "cuda" else CPU_TLS
        config = TransferConfig(
            chunk_tokens=args.chunk,
            layer_group=layer_group,
            layer_taper=self.taper,
            staging_bytes=self._ring_bytes(settings, token_bytes),
            ucx_tls=tls,
            post_receives_ahead=False if args.probe else None,
        )
        self.server = BootstrapServer(1)
        cuda = (device.index or 0) if device.type == "cuda" else None
        self.engine = build_engine(
            "prefill",
            model,
            settings,
            config,
            lambda: UcxDataPlane(tls, cuda),
            model_name="overlap",
            bootstrap=self.server.address,
            token=self.server.token,
        )
        self.agent, self.runner = self.engine.agent, self.engine.runner
        self.scheduler = self.engine.scheduler
        # the prefill's layout (TP 1): the decode side's too
        spec = Spec(config, self.agent.layout, shape, args.dtype, str(device), tls)
        self.decode = DecodeProcess(spec) if args.decode_process else LocalDecode(spec)

    def _ring_bytes(self, settings: EngineSettings, token_bytes: int) -> int:
        if self.args.staging_chunks is not None:
            return self.args.staging_chunks * self.args.chunk * token_bytes
        return prefill_ring_bytes(settings.max_batch_tokens, token_bytes)

    def close(self) -> None:
        if self.transfers:
            self.decode.close()
            self.agent.close()
            self.server.close()

    def prompts(self, count: int) -> list[list[int]]:
        rng = np.random.default_rng(0)
        vocab = self.model.config.vocab_size
        return [rng.integers(0, vocab, self.args.prompt).tolist() for _ in range(count)]

    def run(self, prompts: list[list[int]], registered: bool = False) -> float:
        """Prefill `prompts` (all submitted at once); seconds until every first token is on the
        host (local) or every prompt's KV and first token is on the decode side. `registered`:
        the clock starts once the decode side has registered every room with the prefill side,
        so that the prompts go into the forwards together, as in the local run (otherwise the
        first forward takes those registered by then, and the batch splits by arrival)."""
        began, submitted = time.perf_counter(), time.time()
        if not self.transfers:
            self._local(prompts)
            return time.perf_counter() - began
        rooms = self._submit(prompts)
        if registered:
            self._await_registration(rooms)
            began, submitted = time.perf_counter(), time.time()
        self._transfer(rooms, submitted)
        return time.perf_counter() - began

    def _local(self, prompts: list[list[int]]) -> None:
        seqs = [Sequence(p, SamplingParams(max_tokens=1)) for p in prompts]
        for seq in seqs:
            self.scheduler.add(seq)
        futures = []
        while batch := self.scheduler.schedule():
            launch = Launch.begin([])
            future = self.runner.sample_prompt_ends(batch, self.runner.forward(batch))
            self.launches.append(launch.end())
            if future is not None:
                futures.append(future)
            self.scheduler.computed(batch)
        for future in futures:
            future.result()
        for seq in seqs:
            self.blocks.deallocate(seq.id)

    def _submit(self, prompts: list[list[int]]) -> set[int]:
        """Open each prompt's room on the decode side and submit it to the prefill engine."""
        rooms = set()
        for i, prompt in enumerate(prompts):
            room = next(self.next_room)
            slots = np.arange(i * len(prompt), (i + 1) * len(prompt))
            self.decode.open(room, slots, self.server.address)
            self.engine.submit(room, prompt, SamplingParams(max_tokens=1))
            rooms.add(room)
        return rooms

    def _await_registration(self, rooms: set[int]) -> None:
        senders = [self.engine.rooms[room].sender for room in rooms]
        deadline = time.monotonic() + 30.0
        while any(sender.poll() is KVPoll.Bootstrapping for sender in senders):
            if time.monotonic() > deadline:
                raise RuntimeError("the decode side did not register the rooms within 30 s")
            select.select([self.agent.bell], [], [], WAIT_S)
            self.agent.bell.clear()

    def _transfer(self, waiting: set[int], submitted: float) -> None:
        ended, loops = [], self._loops()
        while True:
            launch: list[Launch] = []  # the forward's, once it began
            began = lambda launch=launch: launch.append(Launch.begin(loops))  # noqa: E731
            if forwarded := self.engine.step(before_forward=began):
                self.launches.append(launch[0].end())
            self.engine.take_output()
            self.engine.samples.take()
            for room in self.decode.take_done():
                waiting.discard(room.room)
                ended.append(room)
            if not self.engine.busy and not waiting:
                break
            if not forwarded:  # as a rank does: sleep until one of the rooms has news
                select.select([self.agent.bell, self.decode], [], [], WAIT_S)
                self.agent.bell.clear()
        failed = [room.failure for room in ended if room.failure is not None]
        if failed:
            raise RuntimeError(f"transfer failed: {failed[0]}")
        for room in ended:  # the room's stages (transport/timeline.py)
            self.timelines.append({k: (at - submitted) * 1e3 for k, at in room.marks.items()})

    def _cores(self) -> list:
        """The transfer agents' cores in this process: the prefill rank's, and the decode
        side's when it runs here."""
        cores = [self.agent.core]
        if isinstance(self.decode, LocalDecode):
            cores.append(self.decode.agent.core)
        return cores

    def _loops(self) -> list:
        """The transfer threads of this process (`_cores`'s)."""
        return [core.loop for core in self._cores()]


def measure(
    args, model: Model, name: str, layer_group: int | None, held: bool = False, taper: bool = True
) -> dict:
    bench = Bench(args, model, layer_group, held, taper)
    try:
        prompts = bench.prompts(args.requests)
        # warm-up: kernels, endpoints, the ring, and the batch's own shapes (a first batched
        # forward pays for them once, and only the first variant measured would)
        bench.run(prompts[:1])
        bench.run(prompts)
        bench.timelines.clear()
        bench.launches.clear()
        latency = [bench.run([prompt]) for prompt in prompts[: args.repeats]]
        launches = list(bench.launches)
        # median ms after submission at which each stage ended, one prompt at a time
        stages = stage_times(bench.timelines, statistics.median)
        bench.timelines.clear()
        batch = bench.run(prompts, registered=True)
        # the throughput batch: when the first and the last of its prompts reached each stage
        last = stage_times(bench.timelines, max)
        batch_stages = {
            stage: [at, last[stage]] for stage, at in stage_times(bench.timelines, min).items()
        }
        tokens = args.prompt * len(prompts)
        return {
            "name": name,
            "layer_group": layer_group,
            "layer_taper": taper,
            "held": held,
            "latency_ms": statistics.median(latency) * 1e3,
            "batch_s": batch,
            "tokens_per_s": tokens / batch,
            "stages_ms": stages,
            "batch_stages_ms": batch_stages,
            **Launch.medians(launches),  # one prompt's forwards, and the threads meanwhile
        }
    finally:
        bench.close()


def main() -> None:
    args = parse_args(__doc__)
    model = build_model(args)
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; {args.layers} layers, hidden {args.hidden}, {args.kv_heads} KV heads, "
        f"{args.dtype}; prompts of {args.prompt} tokens in chunks of {args.chunk}"
    )
    runs = [
        measure(args, model, "local", None),
        measure(args, model, "whole-chunk", 0),
        measure(args, model, f"layer-wise ({args.layer_group})", args.layer_group),
    ]
    if args.uniform:
        name = f"layer-wise ({args.layer_group}), uniform"
        runs.append(measure(args, model, name, args.layer_group, taper=False))
    if args.held:
        runs.append(measure(args, model, "whole-chunk, held", 0, held=True))
    local = runs[0]
    width = max(len(run["name"]) for run in runs) + 2
    print(f"{'':{width}}{'latency ms':>12}{'vs local':>10}{'prefill tok/s':>15}{'vs local':>10}")
    for run in runs:
        run["latency_overhead"] = run["latency_ms"] / local["latency_ms"] - 1
        run["throughput_ratio"] = run["tokens_per_s"] / local["tokens_per_s"]
        print(
            f"{run['name']:{width}}{run['latency_ms']:12.1f}{run['latency_overhead']:+10.1%}"
            f"{run['tokens_per_s']:15.0f}{run['throughput_ratio']:10.1%}"
        )
    print(Launch.table(runs))
    if args.held:
        whole, held = runs[1], runs[-1]
        print(
            f"whole-chunk, prefill on the prompt's arrival / held until registered: TTFT "
            f"{whole['latency_ms'] / held['latency_ms']:.2f}x ({whole['latency_ms']:.2f} vs "
            f"{held['latency_ms']:.2f} ms)"
        )
    for run in runs[2:]:  # the KV on decode (its scatter done) against whole-chunk's
        ready, whole = run["stages_ms"].get("kv_ready"), runs[1]["stages_ms"].get("kv_ready")
        if ready and whole:
            print(f"{run['name']}: KV on decode {ready:.2f} ms, {whole - ready:+.2f} ms ahead of "
                  f"whole-chunk ({ready / whole:.3f}x)")  # fmt: skip
    for run in runs[1:]:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in run["stages_ms"].items())
        print(f"{run['name']}: stages end, ms after submission (median): {stages}")
        stages = ", ".join(f"{k} {a:.1f}-{b:.1f}" for k, (a, b) in run["batch_stages_ms"].items())
        print(f"{run['name']}, batch of {args.requests}: first-last prompt, ms: {stages}")
    if args.json:
        with open(args.json, "w") as f:
            on_mps = bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))  # under bench/mps.py
            json.dump(
                {"device": name, "args": vars(args), "mps": on_mps, "runs": runs}, f, indent=1
            )


if __name__ == "__main__":
    main()
