"""What a router in front of a decode daemon adds to a streamed request: its TTFT, its CPU.

    python bench/router_relay.py                        # c=1 and c=16, 64-token answers
    python bench/router_relay.py --concurrency 1,32 --json out.json

Behind the router (`daemon/router/`, as `kvferry router` runs it, on its own thread and loop
in this process) a stand-in decode daemon in a process of its own answers `/health`,
`/status` and streamed completions: each answer's first event at once, then one every
`--step-ms`, as a decode rank steps. In front, `kvferry bench`'s client (`AsyncDaemonClient`)
in processes of their own sends the same requests straight to the stand-in and through the
router, one after the other at each concurrency. Per point: the client's TTFT p50 direct and
through the router (the ratio), the router's CPU per relayed token and per request, its
tokens a second. Where the CPU per token times the tokens a second nears one core, the router
is what limits a fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import subprocess
import sys
import time

import uvloop
from aiohttp import web

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.senders import client_processes, send
from kvferry.daemon.cli.bench.workload import Prompt
from kvferry.daemon.router.server import RouterServer
from kvferry.daemon.server.config import RouterConfig

STATUS = {"requests": {"in_flight": 0}, "ranks": [{"kv_pages": {"total": 1 << 20, "used": 0}}]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", default="1,16", help="points, comma-separated")
    p.add_argument("--requests", type=int, default=128, help="measured per point (>= 2c)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--step-ms", type=float, default=2.0, help="the stand-in's time per token")
    p.add_argument("--port", type=int, default=0, help="the stand-in's (0: a free one)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # a point's client process
    return p.parse_args()


# --- the stand-in decode daemon -------------------------------------------------------------


def stand_in(port, step_s: float, ready) -> None:
    """A decode daemon's HTTP contract, answered at once: health, load, streamed answers; on
    `port.value` (0: a free one, written back)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": 0})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(STATUS)

    async def completions(request: web.Request) -> web.StreamResponse:
        tokens = (await request.json())["max_tokens"]
        answer = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await answer.prepare(request)
        for i in range(tokens):
            finish = "length" if i == tokens - 1 else None
            choice = {"index": 0, "text": "x", "token_ids": [i], "finish_reason": finish}
            await answer.write(b"data: %s\n\n" % json.dumps({"choices": [choice]}).encode())
            if finish is None:
                await asyncio.sleep(step_s)
        await answer.write(b"data: [DONE]\n\n")
        await answer.write_eof()
        return answer

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/status", status)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port.value).start()
        port.value = runner.addresses[0][1]
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


# --- the clients ----------------------------------------------------------------------------


async def load(url: str, concurrency: int, requests: int, tokens: int) -> dict:
    """A point's client process, sending as `kvferry bench` sends (`senders.send`):
    `concurrency` requests to warm up, then `requests` measured."""
    ask = Prompt(prompt=list(range(16)), input_len=16, output_len=tokens)
    async with AsyncDaemonClient(url, 120.0, concurrency) as client:
        await send(client, [ask] * concurrency, [0.0] * concurrency, concurrency)
        records, _ = await send(client, [ask] * requests, [0.0] * requests, concurrency)
    if not all(r.ok and r.output_tokens == tokens for r in records):
        raise SystemExit(f"a request failed or came short: {records[0]}")
    return {"ttfts": [r.ttft_s for r in records]}


def clients(url: str, concurrency: int, requests: int, tokens: int) -> list[float]:
    """The TTFTs of a point, its load split over client processes as `kvferry bench` splits
    it (senders.client_processes)."""
    shares = min(client_processes(concurrency), concurrency)
    running = []
    for k in range(shares):
        command = [sys.executable, __file__, "--client", url, "--tokens", str(tokens)]
        command += ["--concurrency", str(concurrency // shares + (k < concurrency % shares))]
        command += ["--requests", str(requests // shares + (k < requests % shares))]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    outs = [client.communicate(timeout=600)[0] for client in running]
    if any(client.returncode for client in running):
        raise SystemExit(f"a client failed at c={concurrency}")
    return [t for out in outs for t in json.loads(out)["ttfts"]]


def thread_cpu(router: RouterServer) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(router._thread.ident))


def point(router: RouterServer, direct: str, concurrency: int, args: argparse.Namespace) -> dict:
    requests = max(args.requests, 2 * concurrency)
    straight = clients(direct, concurrency, requests, args.tokens)
    cpu, wall = thread_cpu(router), time.monotonic()
    through = clients(router.url, concurrency, requests, args.tokens)
    cpu, wall = thread_cpu(router) - cpu, time.monotonic() - wall
    every = requests + concurrency  # warm-ups included, as in the router's CPU
    return {
        "concurrency": concurrency,
        "direct_ttft_ms_p50": statistics.median(straight) * 1e3,
        "router_ttft_ms_p50": statistics.median(through) * 1e3,
        "ttft_ratio": statistics.median(through) / statistics.median(straight),
        "router_cpu_us_per_token": cpu / (every * args.tokens) * 1e6,
        "router_cpu_us_per_request": cpu / every * 1e6,
        "tokens_per_s": every * args.tokens / wall,
    }


def main() -> None:
    args = parse_args()
    if args.client:
        print(json.dumps(uvloop.run(load(args.client, *map(int, (
            args.concurrency, args.requests, args.tokens))))))  # fmt: skip
        return
    spawn = multiprocessing.get_context("spawn")
    ready, port = spawn.Event(), spawn.Value("i", args.port)
    server = spawn.Process(target=stand_in, args=(port, args.step_ms / 1e3, ready))
    server.daemon = True
    server.start()
    if not ready.wait(60):
        raise SystemExit("the stand-in decode daemon did not start")
    direct = f"http://127.0.0.1:{port.value}"
    router = RouterServer(RouterConfig(name="bench", targets=[direct]))
    router.start()
    try:
        points = [point(router, direct, int(c), args) for c in args.concurrency.split(",")]
    finally:
        router.stop()
        server.terminate()
    report(points, args)


def report(points: list[dict], args: argparse.Namespace) -> None:
    print(f"a router in front of a decode daemon, {args.tokens}-token streamed answers, a "
          f"token every {args.step_ms:g} ms")  # fmt: skip
    print(f"{'c':>4} {'TTFT p50 direct ms':>19} {'via router':>11} {'ratio':>6} "
          f"{'router us/token':>16} {'us/request':>11} {'tok/s':>8}")  # fmt: skip
    for r in points:
        print(f"{r['concurrency']:>4} {r['direct_ttft_ms_p50']:>19.2f} "
              f"{r['router_ttft_ms_p50']:>11.2f} {r['ttft_ratio']:>5.2f}x "
              f"{r['router_cpu_us_per_token']:>16.1f} {r['router_cpu_us_per_request']:>11.0f} "
              f"{r['tokens_per_s']:>8.0f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
