"""What the decode daemon's HTTP front adds to a streamed request's TTFT, and its CPU per token.

    python bench/http_front.py                       # c=1 and c=32, 2 ms steps, 64 tokens
    python bench/http_front.py --concurrency 1,8,32,64 --step-ms 1 --json out.json

The front under test is the daemon's own (`daemon/server/http_front.py`: uvicorn, Starlette,
completions.py, the inbox of token_events.py); behind it, instead of ranks, a process that acts
as rank 0 does: it takes each request the front submits, and every `--step-ms` it reports each
request in flight its next token over a pipe, the last one with its finish. The daemon's side
takes each report as `Daemon._progress` does (`DecodeRequest.take`, then the request's events).
The load is `kvferry bench`'s own client (`AsyncDaemonClient`, streamed requests), in processes
of their own, as many as `kvferry bench` would use for the concurrency.

Per concurrency: the client's TTFT p50, the daemon's (received -> first token out, from each
answer's timeline) and what lies between, the front's own: the request's way in before the
daemon has it and its first token's way out to the client. Then the daemon's CPU per token and
per request (the front's thread and, where there is one, the thread that reads the reports),
the client's CPU per token, and the ratio of the front's TTFT share at the highest concurrency
to that at the lowest. The tokenizer is a stand-in that spells each id (`decode` joins them),
so the CPU is the front's machinery, not a tokenizer's.

`--reports thread,loop` runs every point with the reports read by a thread of their own that
hands the tokens to the front's loop, as the daemons read their ranks' reports, and again read
on the front's event loop itself, and prints loop ÷ thread for the client's TTFT p50 and the
daemon's CPU per token. `--responses events,starlette` runs them (reports by a thread) with
the front's own response for a stream (`sse.EventStream`) and again with Starlette's
StreamingResponse, which runs a task group beside each, and prints starlette ÷ events for the
client's TTFT p50 and the daemon's CPU per request. `--stacks fronts,stock` runs them on the
fronts' own stack (uvloop, uvicorn's httptools protocol: `http_protocol.py`) and again on
uvicorn's pure-Python one (asyncio's loop, h11, Nagle off as well), and prints stock ÷ fronts
for the front's CPU per token and its share of TTFT.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import uvloop
from front_standin import StandIn  # bench/ is on sys.path (a script)
from starlette.responses import StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.senders import client_processes, send
from kvferry.daemon.cli.bench.workload import Prompt
from kvferry.daemon.server import http_front, sse
from kvferry.daemon.server.http_front import HTTPFront
from kvferry.transport.loop import GIL_SWITCH_S

STACKS = ("fronts", "stock")  # the daemons' own HTTP stack, uvicorn's pure-Python one
REPORTS = ("thread", "loop")  # reports read by a thread (the daemons' way), on the front's loop
RESPONSES = ("events", "starlette")  # a stream's response: the front's own, Starlette's


class StockProtocol(H11Protocol):
    """uvicorn's h11 protocol as it comes, but for Nagle, which the fronts turn off: left on,
    it would stall the stock stack's first tokens for ACKs and measure that instead."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)

    def connection_made(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def starlette_stream(chunks) -> StreamingResponse:
    """A stream's answer as the front wrote it before its own response (`sse.EventStream`)."""
    headers = {"Cache-Control": "no-cache"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


def start_front(daemon: StandIn, stack: str) -> HTTPFront:
    """The daemon's front on `stack`: `fronts` (its own) or `stock` (uvicorn's pure Python)."""
    if stack == "fronts":
        return HTTPFront(daemon, "127.0.0.1", 0, header_timeout_s=30.0)
    own = (http_front.LOOP, http_front.HeaderTimeoutProtocol)
    http_front.LOOP, http_front.HeaderTimeoutProtocol = "asyncio", StockProtocol
    try:
        return HTTPFront(daemon, "127.0.0.1", 0, header_timeout_s=30.0)
    finally:
        http_front.LOOP, http_front.HeaderTimeoutProtocol = own


async def load(url: str, concurrency: int, requests: int, tokens: int, prompt: int) -> dict:
    """The client's side of a point (run in a process of its own), sent as `kvferry bench`
    sends it (`senders.send`): `concurrency` requests to warm up, then `requests` measured,
    `concurrency` at a time."""
    ask = Prompt(prompt=[7] * prompt, input_len=prompt, output_len=tokens)
    async with AsyncDaemonClient(url, 120.0, concurrency) as client:
        await send(client, [ask] * concurrency, [0.0] * concurrency, concurrency)
        cpu = time.process_time()
        records, wall_s = await send(client, [ask] * requests, [0.0] * requests, concurrency)
    cpu_s = time.process_time() - cpu
    if not all(r.ok for r in records):
        raise SystemExit(f"a request failed: {next(r.error for r in records if not r.ok)}")
    # the timeline's stages are seconds after the daemon received the request
    kept = [(r.ttft_s, r.timeline["first_token_out"], r.output_tokens) for r in records]
    return {"records": kept, "wall_s": wall_s, "cpu_s": cpu_s}


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def daemon_cpu(front: HTTPFront, daemon: StandIn) -> float:
    """The CPU time of the daemon's threads a stream's tokens pass: the front's, the reader's."""
    return sum(thread_cpu(t) for t in (front.thread, daemon.reader) if t is not None)


def point(front: HTTPFront, daemon: StandIn, concurrency: int, args: argparse.Namespace) -> dict:
    """One concurrency, its load split over client processes as `kvferry bench` splits it
    (senders.client_processes): one process alone saturates before the front does."""
    requests = max(args.requests, 2 * concurrency)
    url = f"http://127.0.0.1:{front.server_port}"
    shares = min(client_processes(concurrency), concurrency)
    clients = []
    before = daemon_cpu(front, daemon)  # across the warm-ups too: each client warms up first
    for k in range(shares):
        command = [sys.executable, __file__, "--client", url, "--tokens", str(args.tokens)]
        command += ["--concurrency", str(concurrency // shares + (k < concurrency % shares))]
        command += ["--requests", str(requests // shares + (k < requests % shares))]
        command += ["--prompt", str(args.prompt)]
        clients.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    outs = [client.communicate(timeout=600)[0] for client in clients]
    front_cpu = daemon_cpu(front, daemon) - before
    if any(client.returncode for client in clients):
        raise SystemExit(f"a client failed at c={concurrency}")
    results = [json.loads(out) for out in outs]
    records = [r for result in results for r in result["records"]]
    ttft = [r[0] for r in records]
    inside = [r[1] for r in records]
    outside = [a - b for a, b in zip(ttft, inside, strict=True)]
    tokens = sum(r[2] for r in records)
    every = requests + concurrency  # warm-up included, as in the front's CPU
    return {
        "concurrency": concurrency,
        "client_processes": shares,
        "ttft_ms_p50": statistics.median(ttft) * 1e3,
        "daemon_ttft_ms_p50": statistics.median(inside) * 1e3,
        "front_ttft_ms_p50": statistics.median(outside) * 1e3,
        "tokens_per_s": tokens / max(result["wall_s"] for result in results),
        "front_cpu_us_per_token": front_cpu / (tokens * every / requests) * 1e6,
        "front_cpu_us_per_request": front_cpu / every * 1e6,
        "client_cpu_us_per_token": sum(result["cpu_s"] for result in results) / tokens * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", default="1,32", help="points, comma-separated")
    p.add_argument("--requests", type=int, default=128, help="measured per point (>= 2c)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--prompt", type=int, default=768, help="prompt tokens sent")
    p.add_argument("--step-ms", type=float, default=2.0, help="time between engine steps")
    p.add_argument("--stacks", default="fronts,stock", help="fronts (the daemons' own), stock")
    p.add_argument("--reports", default="thread,loop", help="thread (the daemons'), loop")
    p.add_argument("--responses", default="events,starlette", help="events (the front's own), "
                   "starlette (StreamingResponse); with the reports read by a thread")  # fmt: skip
    p.add_argument("--json", help="write the results here")
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # a point's client process
    args = p.parse_args()
    if args.client:
        point_args = (int(args.concurrency), args.requests, args.tokens, args.prompt)
        print(json.dumps(uvloop.run(load(args.client, *point_args))))
        return
    axes = {}
    for name, known in (("stacks", STACKS), ("reports", REPORTS), ("responses", RESPONSES)):
        axes[name] = getattr(args, name).split(",")
        if not axes[name] or set(axes[name]) - set(known):
            p.error(f"--{name} {getattr(args, name)!r}: a comma-separated list of "
                    f"{', '.join(known)}")  # fmt: skip
    sys.setswitchinterval(GIL_SWITCH_S)  # as the daemon's process has it (daemon.serve)
    runs, own = {}, sse.EventStream
    for stack in axes["stacks"]:
        for how in axes["reports"]:
            for response in axes["responses"] if how == "thread" else ["events"]:
                sse.EventStream = starlette_stream if response == "starlette" else own
                name = (
                    stack
                    + ("/loop" if how == "loop" else "")
                    + ("/starlette" if response == "starlette" else "")
                )
                try:
                    runs[name] = run(stack, how, args)
                finally:
                    sse.EventStream = own
    report(runs, args)


def run(stack: str, how: str, args: argparse.Namespace) -> list[dict]:
    """Every point on a front of `stack` with the reports read `how`."""
    daemon = StandIn(args.step_ms / 1e3, how)
    front = start_front(daemon, stack)
    daemon.serve()
    try:
        return [point(front, daemon, int(c), args) for c in args.concurrency.split(",")]
    finally:
        daemon.unserve()
        front.shutdown()
        daemon.close()


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(f"HTTP front, {args.tokens}-token streamed answers, a step every {args.step_ms:g} ms")
    print(
        f"{'run':>17} {'c':>4} {'procs':>5} {'TTFT p50 ms':>12} {'daemon':>8} {'front':>8} "
        f"{'tok/s':>8} {'front us/token':>15} {'us/request':>11} {'client us/token':>16}"
    )
    for stack, points in runs.items():
        for r in points:
            print(
                f"{stack:>17} {r['concurrency']:>4} {r['client_processes']:>5} "
                f"{r['ttft_ms_p50']:>12.2f} {r['daemon_ttft_ms_p50']:>8.2f} "
                f"{r['front_ttft_ms_p50']:>8.2f} {r['tokens_per_s']:>8.0f} "
                f"{r['front_cpu_us_per_token']:>15.1f} {r['front_cpu_us_per_request']:>11.0f} "
                f"{r['client_cpu_us_per_token']:>16.1f}"
            )
    out = {"args": vars(args)}
    for stack, points in runs.items():
        low, high = points[0], points[-1]
        ratio = high["front_ttft_ms_p50"] / max(low["front_ttft_ms_p50"], 1e-9)
        print(
            f"{stack}: front's share of TTFT, c={high['concurrency']} / c={low['concurrency']}: "
            f"{ratio:.2f}x ({high['front_ttft_ms_p50']:.2f} vs {low['front_ttft_ms_p50']:.2f} ms)"
        )
        key = "" if stack == "fronts" else f"{stack.replace('/', '_')}_"
        out[f"{key}points"], out[f"{key}front_ratio"] = points, ratio
    if "fronts" in runs and "stock" in runs:
        own, stock = runs["fronts"][-1], runs["stock"][-1]
        cpu = stock["front_cpu_us_per_token"] / own["front_cpu_us_per_token"]
        ttft = stock["front_ttft_ms_p50"] / max(own["front_ttft_ms_p50"], 1e-9)
        print(
            f"stock / fronts at c={own['concurrency']}: front CPU per token {cpu:.2f}x "
            f"({stock['front_cpu_us_per_token']:.1f} vs {own['front_cpu_us_per_token']:.1f} us), "
            f"front's TTFT {ttft:.2f}x"
        )
        out["stock_over_fronts"] = {"cpu_per_token": cpu, "front_ttft": ttft}
    for stack in STACKS:
        key = "" if stack == "fronts" else stack + "_"
        if stack in runs and f"{stack}/loop" in runs:
            label = "reports on the loop / by a thread"
            out[f"{key}loop_over_thread"] = compare(
                stack, label, runs[stack], runs[f"{stack}/loop"], "front_cpu_us_per_token"
            )
        if stack in runs and f"{stack}/starlette" in runs:
            label = "Starlette's StreamingResponse / the front's own"
            out[f"{key}starlette_over_events"] = compare(
                stack, label, runs[stack], runs[f"{stack}/starlette"], "front_cpu_us_per_request"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def compare(stack: str, label: str, base: list[dict], other: list[dict], cpu_key: str) -> dict:
    """`other` ÷ `base`: the client's TTFT p50 at each concurrency, the daemon's CPU
    (`cpu_key`: per token or per request) at the highest."""
    ttft = {
        str(a["concurrency"]): b["ttft_ms_p50"] / max(a["ttft_ms_p50"], 1e-9)
        for a, b in zip(base, other, strict=True)
    }
    cpu = other[-1][cpu_key] / base[-1][cpu_key]
    shown = ", ".join(
        f"c={a['concurrency']} {ttft[str(a['concurrency'])]:.2f}x "
        f"({b['ttft_ms_p50']:.2f} vs {a['ttft_ms_p50']:.2f} ms)"
        for a, b in zip(base, other, strict=True)
    )
    per = cpu_key.rsplit("_", 1)[1]
    print(f"{stack}, {label}: client TTFT p50 {shown}; daemon CPU per {per} at "
          f"c={base[-1]['concurrency']} {cpu:.2f}x ({other[-1][cpu_key]:.1f} vs "
          f"{base[-1][cpu_key]:.1f} us)")  # fmt: skip
    return {"ttft": ttft, f"cpu_per_{per}": cpu}


if __name__ == "__main__":
    main()
