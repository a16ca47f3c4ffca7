"""What `kvferry bench`'s client adds to what it measures: aiohttp's client against httpx's.

    python bench/client_overhead.py                     # 200 requests at c=1, 256 at c=16
    python bench/client_overhead.py --tokens 64 --json out.json

A load generator's own time is inside every TTFT it reports: it builds and writes the request,
then reads and parses the first event of the answer. Here a server in a process of its own
answers each streamed completion at once: its first event, then one a millisecond, as a decode
rank would step. What is measured is the client and the wire. Both clients stream the same
requests through the same event reader (replies.py): `AsyncDaemonClient` (aiohttp, what
`kvferry bench` uses) and httpx's stream (what it used before). Per client: TTFT p50 and p90 at
c=1 (the request's start to its first token parsed) and the client's CPU per streamed token at
`--concurrency` (answers of `--tokens`), with httpx ÷ aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import statistics
import time

import httpx
import msgspec
import uvloop

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.client import JSON_BODY
from kvferry.daemon.cli.replies import EventReader, Tally
from kvferry.daemon.server.api import CompletionRequest

CLIENTS = ("aiohttp", "httpx")
FIRST_TOKENS = 2  # tokens of an answer at c=1, where only the first one's time is used
STEP_S = 0.001  # the server's pause between an answer's events (a decode step)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=200, help="at c=1")
    p.add_argument("--load-requests", type=int, default=256, help="at --concurrency")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="events per answer")
    p.add_argument("--port", type=int, default=18541)
    p.add_argument("--rounds", type=int, default=2, help="each client this many times, alternating")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


# --- the server: a streamed answer at once -------------------------------------------------


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@functools.cache
def _answer(tokens: int) -> list[bytes]:
    """A streamed completion's answer, chunked as the daemons' front sends it: its head with
    the first event, then each write after it (an event, the last with the end)."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    head += b"transfer-encoding: chunked\r\n\r\n"
    events = [
        b'data: {"choices":[{"index":0,"text":"x","token_ids":[%d],"finish_reason":null}]}\n\n' % i
        for i in range(tokens)
    ]
    writes = [_chunk(e) for e in events]
    writes[0] = head + writes[0]
    writes[-1] += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return writes


class _Server(asyncio.Protocol):
    """Answers each request at once, as a decode rank would with no other work: its first
    event alone (as a first token comes), then one event every STEP_S."""

    def connection_made(self, transport) -> None:
        self.transport, self.buffer = transport, b""
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:  # a request: its headers, then its body
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self._write(_answer(msgspec.json.decode(body)["max_tokens"]), 0)

    def _write(self, answer: list[bytes], i: int) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(answer[i])
        if i + 1 < len(answer):
            self.loop.call_later(STEP_S, self._write, answer, i + 1)


def serve(port: int, ready) -> None:
    async def main():
        server = await asyncio.get_running_loop().create_server(_Server, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --- the clients ----------------------------------------------------------------------------


class HttpxClient:
    """The same streamed requests on httpx's stream (the bench's client before aiohttp)."""

    def __init__(self, url: str, connections: int) -> None:
        self.url = url
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._http = httpx.AsyncClient(base_url=url, limits=limits, trust_env=False)

    async def __aenter__(self) -> HttpxClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def stream(self, request: CompletionRequest):
        start = time.monotonic()
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=True))
        tally, reader = Tally(start), EventReader(self.url)
        async with self._http.stream(
            "POST", "/v1/completions", content=body, headers=JSON_BODY
        ) as reply:
            async for line in reply.aiter_lines():
                event = reader.feed(line)
                if event is not None:
                    tally.add(event, streamed=True)
        reader.ended()
        return tally.result()


def client(name: str, url: str, connections: int):
    if name == "httpx":
        return HttpxClient(url, connections)
    return AsyncDaemonClient(url, 60.0, connections)


async def point(name: str, url: str, requests: int, concurrency: int, tokens: int) -> dict:
    """`requests` streamed completions, `concurrency` at a time: TTFT and client CPU."""
    request = CompletionRequest(prompt=list(range(16)), max_tokens=tokens)
    async with client(name, url, concurrency) as http:
        for _ in range(8):  # connections open, first-use costs paid
            await http.stream(request)
        queue = list(range(requests))
        ttfts: list[float] = []

        async def worker():
            while queue:
                queue.pop()
                done = await http.stream(request)
                assert len(done.token_ids) == tokens, done
                ttfts.append(done.ttft_s)

        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    ttfts.sort()
    return {
        "ttft_p50_us": statistics.median(ttfts) * 1e6,
        "ttft_p90_us": ttfts[int(0.9 * (len(ttfts) - 1))] * 1e6,
        "cpu_per_token_us": cpu / (requests * tokens) * 1e6,
        "tokens_per_s": requests * tokens / wall,
    }


def main() -> None:
    args = parse_args()
    url = f"http://127.0.0.1:{args.port}"
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    server = spawn.Process(target=serve, args=(args.port, ready), daemon=True)
    server.start()
    if not ready.wait(60):
        raise SystemExit("the server did not start")
    runs: dict[str, list[dict]] = {name: [] for name in CLIENTS}
    try:
        for _ in range(args.rounds):
            for name in CLIENTS:
                one = uvloop.run(point(name, url, args.requests, 1, FIRST_TOKENS))
                load = uvloop.run(
                    point(name, url, args.load_requests, args.concurrency, args.tokens)
                )
                runs[name].append({"c1": one, "load": load})
    finally:
        server.kill()
    result = summarize(runs, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Medians over the rounds; prints the table and httpx ÷ aiohttp."""

    def median(name: str, part: str, key: str) -> float:
        return statistics.median(run[part][key] for run in runs[name])

    figures = {
        name: {
            "ttft_p50_us_c1": median(name, "c1", "ttft_p50_us"),
            "ttft_p90_us_c1": median(name, "c1", "ttft_p90_us"),
            "cpu_per_token_us": median(name, "load", "cpu_per_token_us"),
            "tokens_per_s": median(name, "load", "tokens_per_s"),
        }
        for name in CLIENTS
    }
    c = args.concurrency
    print(f"streamed completions of {args.tokens} tokens from a server answering at once")
    print(f"{'client':8} {'TTFT p50 c=1':>14} {'p90':>9} {f'CPU/token c={c}':>16} {'tok/s':>9}")
    for name, f in figures.items():
        print(
            f"{name:8} {f['ttft_p50_us_c1']:11.1f} µs {f['ttft_p90_us_c1']:9.1f} "
            f"{f['cpu_per_token_us']:13.2f} µs {f['tokens_per_s']:9.0f}"
        )
    ratios = {
        key: figures["httpx"][key] / figures["aiohttp"][key]
        for key in ("ttft_p50_us_c1", "cpu_per_token_us")
    }
    print(
        f"httpx ÷ aiohttp: TTFT p50 at c=1 {ratios['ttft_p50_us_c1']:.2f}×, "
        f"CPU per token at c={c} {ratios['cpu_per_token_us']:.2f}×"
    )
    return {"figures": figures, "httpx_over_aiohttp": ratios, "runs": runs, "args": vars(args)}


if __name__ == "__main__":
    main()
