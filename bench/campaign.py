"""The performance campaign in one invocation: check, measure, and compare with the targets.

    python bench/campaign.py                      # on a GPU machine: the full campaign
    python bench/campaign.py --quick              # small sizes (a CPU smoke run)
    python bench/campaign.py --stages kernels,transfer --out-dir results/

Stages, each a separate process whose output is kept in OUT_DIR (a failed stage is reported and
the others still run):

  check     the gpu-marked tests (they build the CUDA kernels); skipped without a GPU
  kernels   bench/copy_kernels.py: gather/scatter vs the copy roofline and torch indexing
  transfer  bench/transfer.py: staged vs raw ucxx vs per-token slices, same bytes; on a GPU
            staged and raw again with every process on a private CUDA MPS server
  perftest  ucx_perftest (from the libucx wheel): UCX's own tag bandwidth for the same size
  host      bench/host_costs.py: host CPU per step of the transfer thread, quiet and during a
            forward; bench/control_path.py: the transfer threads' CPU per request, tiny KV;
            group_exchange.py: a TP step's exchanges, gloo vs the ranks' pipes; http_front.py:
            the decode front's TTFT and CPU, reports by a thread vs its loop, its own response
            for a stream vs Starlette's; client_overhead.py: `kvferry bench`'s client, httpx vs
            aiohttp; router_relay.py: a router's TTFT and CPU; handoff.py: a prompt's hand-off,
            a connection each vs kept; gc_pauses.py: a full GC pass; on a GPU, device_reduce.py:
            TP ranks sharing it, all-reduces ordered by events vs a host sync each, and on MPS by
            barrier kernels (eager, and as a CUDA graph); forward_host.py: a forward's host
            launch vs its device time
  overlap   bench/overlap.py: prefill with vs without transfers, colocated vs disaggregated
            TTFT, whole-chunk vs layer-wise (prompts past 2,048 tokens in chunks of 2,048 and in
            one); the first length again with decode in its own process on a private MPS server
            where there is one; then bench/hops.py: one prompt's transfer, hop by hop
  engine    bench/engine.py: decode step at batch 1/8/32/128 and contexts 1k/8k, eager vs CUDA
            graphs, against the memory floor; prefill tok/s, paged kernel vs contiguous SDPA
            (the decode model of deploy/h200-llama8b.yaml)
  e2e       `kvferry bench` on seven variants of one deployment file: heterogeneous TP staged,
            the same layer-wise, slice mode, messages of several chunks (`together`), homogeneous
            TP, every daemon TP1 (`tp1`), decode's receives posted as their messages come
            (`probe`); on a GPU with MPS, the first on an MPS server

Then one table (bench/campaign_summary.py; the e2e stage's rows in bench/campaign_e2e.py): every
target of docs/benchmarks.md, what was measured, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from campaign_e2e import stage_e2e  # noqa: F401 (a stage: main finds it by name)
from campaign_host import SMALL_BENCHES
from campaign_rows import print_table, read_json
from campaign_summary import VARIANTS, summary_rows

from kvferry.daemon.cli.mps import CONTROL as MPS_CONTROL

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STAGES = ("check", "kernels", "transfer", "perftest", "host", "overlap", "engine", "e2e")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in any order")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--out-dir", default=None, help="default: campaign-<time>/")
    p.add_argument("--deploy", default=None, help="deployment file of the e2e stage")
    p.add_argument("--concurrency", default=None, help="e2e points (default 1,8,32; quick 1,4)")
    p.add_argument("--layer-group", type=int, default=4, help="layers per message, layer-wise")
    p.add_argument("--prompts", default=None, help="overlap prompt lengths (default 2048,8192,"
                   "32768 on a GPU, quick 2048; on a CPU 256)")  # fmt: skip
    p.add_argument("--variants", default=",".join(VARIANTS), help="e2e deployment variants")
    p.add_argument("--e2e-rounds", type=int, default=1, help="run the e2e variants this many "
                   "times, in alternating order; each point is the round with the median TTFT "
                   "p50")  # fmt: skip
    p.add_argument("--stage-timeout", type=float, default=900, help="seconds per stage")
    args = p.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    args.gpu = _gpu()
    args.deploy = args.deploy or str(
        ROOT / "deploy" / ("h200-llama8b.yaml" if args.gpu else "tiny.yaml")
    )
    args.concurrency = args.concurrency or ("1,4" if args.quick else "1,8,32")
    gpu_prompts = {False: "2048,8192,32768", True: "2048"}[args.quick] if args.gpu else None
    prompts = args.prompts or gpu_prompts or "256"
    args.prompts = [int(n) for n in prompts.split(",")]
    args.variants = [v for v in VARIANTS if v in args.variants.split(",")]
    args.out_dir = Path(args.out_dir or f"campaign-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def _gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class Stage:
    """One stage's process: its command, log and outcome."""

    def __init__(self, args, name: str) -> None:
        self.args, self.name = args, name
        self.log = args.out_dir / f"{name}.log"
        self.ok: bool | None = None  # None: not run
        self.note = ""

    def run(self, command: list[str], timeout: float | None = None, env=None) -> bool:
        print(f"[{self.name}] {' '.join(command)}", flush=True)
        began = time.monotonic()
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = proc.wait(timeout or self.args.stage_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # `kvferry bench` stops its deployment
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                code = "timeout"
        seconds = time.monotonic() - began
        self.ok = code == 0
        if not self.ok:
            self.note = f"{' '.join(command[:3])}... exited {code}; see {self.log}"
        print(f"[{self.name}] {'ok' if self.ok else 'FAILED'} in {seconds:.0f}s", flush=True)
        return self.ok


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


def stage_check(stage: Stage) -> None:
    if not stage.args.gpu:
        stage.ok, stage.note = None, "skipped: no GPU (the gpu tests need one)"
        return
    stage.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"])


def stage_kernels(stage: Stage) -> None:
    out = stage.args.out_dir / "kernels.json"
    sizes = ["--tokens", "512,2048", "--layers", "8", "--iters", "3"] if stage.args.quick else []
    stage.run(python("copy_kernels.py", *sizes, "--json", str(out)))


def stage_transfer(stage: Stage) -> None:
    out = stage.args.out_dir / "transfer.json"
    sizes = []
    if stage.args.quick:
        sizes = ["--tokens", "512", "--chunk", "128", "--layers", "4", "--slice-tokens", "16"]
        sizes += ["--requests", "2", "--staging-mib", "16", "--raw-mib", "16"]
    if not stage.run(python("transfer.py", *sizes, "--json", str(out))) or not stage.args.gpu:
        return
    # both sides' processes on one GPU take turns on it unless they share an MPS server: the
    # staged and raw runs again on one, where there is one
    on_mps = stage.args.out_dir / "transfer-mps.json"
    if shutil.which(MPS_CONTROL) is None:
        _write_json(on_mps, {"mps_note": f"not measured: {MPS_CONTROL} is not on the PATH"})
        return
    runs = ["--slice-tokens", "0", "--data-path", "native"]
    stage.run(python("mps.py", "--", *python("transfer.py", *sizes, *runs, "--json", str(on_mps))))


def stage_host(stage: Stage) -> None:
    out, quick = stage.args.out_dir, stage.args.quick
    sizes = ["--calls", "200", "--tokens", "1024", "--chunk", "128"] if quick else []
    if stage.run(python("host_costs.py", *sizes, "--json", str(out / "host.json"))):
        for bench, quick_args, name in SMALL_BENCHES:
            stage.run(python(bench, *(quick_args if quick else []), "--json", str(out / name)))
        if stage.args.gpu:  # TP ranks sharing the GPU: a forward's all-reduces (two orderings,
            # on MPS too); a prefill forward's launch on the host against the device's time
            reduce = ["--mps", "--json", str(out / "device_reduce.json")]
            stage.run(python("device_reduce.py", *reduce))
            stage.run(python("forward_host.py", "--json", str(out / "forward_host.json")))


def stage_perftest(stage: Stage) -> None:
    """UCX's own tag-matched bandwidth (ucx_perftest, server and client on this host) for one
    staged request's bytes per decode rank, from the same memory the transfer bench uses."""
    binary = _perftest_binary()
    if binary is None:
        stage.ok, stage.note = False, "ucx_perftest not found (libucx wheel: libucx/bin)"
        return
    transfer = read_json(stage.args.out_dir / "transfer.json")
    size = 16 << 20 if stage.args.quick else 256 << 20
    if transfer:
        size = min(size, int(transfer["rows"][1]["request_mib"] * 2**20))
    memory = "cuda" if stage.args.gpu else "host"
    tls = "cuda_ipc,cuda_copy,tcp,sm,self" if stage.args.gpu else "tcp,sm,self"
    iters = "20" if stage.args.quick else "50"
    libs = str(Path(binary).parent.parent / "lib")  # the wheel's binaries need its libraries
    path = ":".join(filter(None, [libs, os.environ.get("LD_LIBRARY_PATH")]))
    env = dict(os.environ, UCX_TLS=tls, LD_LIBRARY_PATH=path)
    port = str(_free_port())
    common = ["-t", "tag_bw", "-m", memory, "-s", str(size), "-n", iters, "-p", port]
    with open(stage.log, "a") as log:
        server = subprocess.Popen(
            [binary, *common], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(1.0)
        try:
            stage.run([binary, *common, "127.0.0.1"], timeout=300, env=env)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    gbps = _perftest_gbps(stage.log)
    if stage.ok and gbps is None:
        stage.ok, stage.note = False, "no bandwidth line in the ucx_perftest output"
    _write_json(
        stage.args.out_dir / "perftest.json", {"bytes": size, "memory": memory, "gbps": gbps}
    )


def _perftest_binary() -> str | None:
    found = shutil.which("ucx_perftest")
    if found:
        return found
    try:
        import libucx

        candidate = Path(libucx.__file__).parent / "bin" / "ucx_perftest"
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


def _perftest_gbps(log: Path) -> float | None:
    """The last "Final:" row's average bandwidth (MB/s, 2^20 bytes) in GB/s."""
    gbps = None
    for line in log.read_text().splitlines():
        cells = line.replace("|", " ").split()
        if cells[:1] == ["Final:"] and len(cells) >= 7:
            gbps = float(cells[6]) * 2**20 / 1e9  # iters, latency x3, bandwidth avg, overall
    return gbps


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_overlap(stage: Stage) -> None:
    group = ["--layer-group", str(stage.args.layer_group if stage.args.gpu else 1), "--uniform"]
    failed = []
    for prompt in stage.args.prompts:
        out = stage.args.out_dir / f"overlap-{prompt}.json"
        sizes = ["--prompt", str(prompt), "--chunk", str(min(prompt, 2048))]
        if prompt == stage.args.prompts[0]:  # and held until registered, at the first length
            sizes.append("--held")
        if stage.args.quick:
            sizes += ["--requests", "3", "--repeats", "2"]
        elif prompt > 4096:  # the throughput batch in tokens stays near the default's
            sizes += ["--requests", str(max(2, 32768 // prompt)), "--repeats", "3"]
        else:  # a short prompt's TTFT moves by a tenth between runs of 5 samples
            sizes += ["--repeats", "15"]
        if not stage.run(python("overlap.py", *sizes, *group, "--json", str(out))):
            failed.append(str(prompt))
        if prompt > 2048:  # and the whole prompt in one forward: where layer groups pay off
            out = stage.args.out_dir / f"overlap-{prompt}-one-chunk.json"
            sizes = ["--prompt", str(prompt), "--chunk", str(prompt), "--requests", "1"]
            if not stage.run(python("overlap.py", *sizes, "--repeats", "3", *group,
                                    "--json", str(out))):  # fmt: skip
                failed.append(f"{prompt} in one chunk")
    prompt = stage.args.prompts[0]
    if stage.args.gpu and not stage.args.quick and shutil.which(MPS_CONTROL) is not None:
        # the deployment's shape as near as one GPU gets: the decode agent in a process of its
        # own, the two sharing the GPU through MPS (time-sliced, the decode side's scatters
        # take turns with the prefill forwards, which two GPUs would not)
        out = stage.args.out_dir / f"overlap-{prompt}-mps.json"
        sizes = ["--prompt", str(prompt), "--decode-process", "--json", str(out)]
        if not stage.run(python("mps.py", "--", *python("overlap.py", *sizes, *group))):
            failed.append(f"{prompt} on MPS")
    # one prompt of the first length at a time, traced hop by hop (whole-chunk)
    runs = ["--runs", "5" if stage.args.quick else "200"]
    sizes = ["--prompt", str(prompt), "--chunk", str(min(prompt, 2048)), "--layer-group", "0"]
    hops = str(stage.args.out_dir / "hops.json")
    if not stage.run(python("hops.py", *sizes, *runs, "--json", hops)):
        failed.append("hops")
    stage.ok = not failed
    stage.note = f"failed at prompts {', '.join(failed)}; see {stage.log}" if failed else ""


def stage_engine(stage: Stage) -> None:
    out = stage.args.out_dir / "engine.json"
    sizes = ["--quick"] if stage.args.quick or not stage.args.gpu else []
    stage.run(python("engine.py", *sizes, "--json", str(out)))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off for NCCL TP
    print(f"campaign: {'GPU' if args.gpu else 'CPU'}; stages {', '.join(args.stages)}; "
          f"results in {args.out_dir}", flush=True)  # fmt: skip
    runners = {name: globals()[f"stage_{name}"] for name in STAGES}
    stages = []
    for name in args.stages:
        stage = Stage(args, name)
        runners[name](stage)
        stages.append(stage)
    rows = summary_rows(args.out_dir, args.gpu)
    print_table(rows)
    for stage in stages:
        state = {True: "ok", False: "FAILED", None: "skipped"}[stage.ok]
        print(f"stage {stage.name}: {state} {stage.note}".rstrip())
    _write_json(
        args.out_dir / "summary.json",
        {
            "gpu": args.gpu,
            "stages": {s.name: {"ok": s.ok, "note": s.note} for s in stages},
            "rows": [row.as_dict() for row in rows],
        },
    )
    sys.exit(1 if any(stage.ok is False for stage in stages) else 0)


if __name__ == "__main__":
    main()
