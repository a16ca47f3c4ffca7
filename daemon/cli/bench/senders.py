"""Sending a point's requests: from this process's event loop (`send`), or spread over client
processes (`ClientProcesses`) where one loop would be the bottleneck.

One event loop reads every streamed token of every request: at about 13 µs of client CPU a
token on a small machine (aiohttp's stream, the SSE lines, the JSON: `bench/client_overhead.py`),
one process is busy all the time near 75,000 tokens/s, and well before that a request's TTFT
includes its wait for the loop, not only how long the daemon took to send its first token. A
point with more than CLIENT_CONCURRENCY requests in flight is therefore sent by several
processes, each with its share of the prompts, of the concurrency and of the connections, on
one shared clock (`time.monotonic` is system-wide); their records are merged
back in prompt order.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import aiohttp
import uvloop

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.report import RequestRecord
from kvferry.daemon.cli.bench.workload import BenchError, Prompt
from kvferry.daemon.cli.client import ClientError
from kvferry.daemon.server.api import CompletionRequest

CLIENT_CONCURRENCY = 8  # requests in flight one client process takes at most, where it can
START_AHEAD_S = 0.2  # the processes' common start, this long after the point hands out shares
RELAY_WAIT_S = 1.0  # once the shares are done, how long their last ends may take to come
START_S = 120.0  # how long the client processes may take to start
TIMER_S = 0.001  # the shortest sleep before a request is due (an event loop's timer resolution)


def client_processes(connections: int, cpus: int | None = None) -> int:
    """How many client processes a run whose points have up to `connections` requests in
    flight uses: one per CLIENT_CONCURRENCY of them, at most a quarter of the CPUs (the
    daemons need the rest), at least one."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(math.ceil(connections / CLIENT_CONCURRENCY), cpus // 4))


async def send(
    client: AsyncDaemonClient,
    prompts: list[Prompt],
    arrivals: list[float],
    workers: int,
    on_done: Callable[[RequestRecord], None] | None = None,
    start: float | None = None,
) -> tuple[list[RequestRecord], float]:
    """Sends prompts[i] `arrivals[i]` s after `start` (default: now; or later: at most
    `workers` in flight); the records, in prompt order, and the seconds from the start until
    the last one finished. Cancelled (Ctrl-C), it cancels the requests in flight and drops
    those not sent yet."""
    start = time.monotonic() if start is None else start
    slots = asyncio.Semaphore(workers)

    async def one(index: int, prompt: Prompt) -> RequestRecord:
        async with slots:
            return await _request(client, index, prompt, start, on_done)

    tasks = []
    try:
        for index, (prompt, at) in enumerate(zip(prompts, arrivals, strict=True)):
            # not when due: a burst is sent as one, not as the loop lets it go; a loop's timer
            # may fire a little early (uvloop's count whole milliseconds): never sent before
            while (wait := start + at - time.monotonic()) > 0:
                await asyncio.sleep(max(wait, TIMER_S))
            tasks.append(asyncio.ensure_future(one(index, prompt)))
        records = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # nothing left to cancel unless this ended early
    return list(records), time.monotonic() - start


async def _request(client, index: int, prompt: Prompt, start: float, on_done) -> RequestRecord:
    sent = time.monotonic()
    record = RequestRecord(
        index=index, sent_s=sent - start, input_len=prompt.input_len, output_len=prompt.output_len
    )
    request = CompletionRequest(
        prompt=prompt.prompt, max_tokens=prompt.output_len, temperature=0.0, stream=True
    )
    try:
        completion = await client.stream(request)
    except ClientError as exc:
        record.error, record.error_kind = exc.reason, exc.kind
        record.latency_s = time.monotonic() - sent
    else:
        record.input_len = completion.prompt_tokens or prompt.input_len
        record.output_tokens = len(completion.token_ids)
        record.ttft_s, record.latency_s = completion.ttft_s, completion.latency_s
        record.timeline = completion.timeline
    if on_done is not None:
        on_done(record)
    return record


class ClientProcesses:
    """`count` client processes, started once for a run (spawned: no copy of this process's
    loop or sockets), each sending its share of a point from a loop of its own and telling
    this process of each request as it ends (for the progress line)."""

    def __init__(self, count: int, url: str, timeout: float, api_key: str | None) -> None:
        self.count = count
        self._client = (url, timeout, api_key)
        context = multiprocessing.get_context("spawn")
        self._ended = context.Queue()  # each request's ok, as it ends, from any process
        started = context.Barrier(count)
        self._pool = ProcessPoolExecutor(
            count,
            mp_context=context,
            initializer=_join,
            initargs=(self._ended, started, self._client),
        )
        # Started, through their imports and a first request now, not at the first point's
        # start: a process still starting would begin its share late, and the point's
        # duration with it. Each call waits at the barrier until every process holds one.
        calls = [self._pool.submit(_started, START_S) for _ in range(count)]
        answers = [call.result(timeout=START_S) for call in calls]
        self.pids = {pid for pid, _ in answers}  # those that answered
        self.warmed = sum(warmed for _, warmed in answers)  # their first request answered

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._ended.close()

    async def send(
        self,
        prompts: list[Prompt],
        arrivals: list[float],
        workers: int,
        on_end: Callable[[bool], None] | None = None,
    ) -> tuple[list[RequestRecord], float]:
        """As `send`, the prompts dealt round-robin to the processes, `workers` split evenly;
        `on_end(ok)` is called on this loop as each request ends."""
        loop = asyncio.get_running_loop()
        shares = min(self.count, workers, len(prompts))
        start = time.monotonic() + START_AHEAD_S
        finished = threading.Event()
        relay = asyncio.ensure_future(
            asyncio.to_thread(self._relay, len(prompts), on_end, loop, finished)
        )
        try:
            jobs = [
                loop.run_in_executor(
                    self._pool, _send_share, *self._client, prompts[k::shares],
                    arrivals[k::shares], workers // shares + (k < workers % shares), start,
                )
                for k in range(shares)
            ]  # fmt: skip
            done = await asyncio.gather(*jobs)
        except BrokenProcessPool as exc:
            raise BenchError(f"a client process died: {exc}") from None
        finally:
            finished.set()
            self._ended.put(None)
            await relay
        records: list[RequestRecord | None] = [None] * len(prompts)
        for k, (share, _) in enumerate(done):
            for record in share:
                record.index = record.index * shares + k  # its place among all the prompts
                records[record.index] = record
        return records, max(seconds for _, seconds in done)  # type: ignore[return-value]

    def _relay(self, count: int, on_end, loop, finished: threading.Event) -> None:
        """In a thread: hand each end the processes tell of to `on_end` on `loop`, until all
        `count` came; once the shares are done (`finished`, and a None to wake this), what is
        still on its way gets RELAY_WAIT_S."""
        told = 0
        while told < count:
            try:
                ok = self._ended.get(timeout=RELAY_WAIT_S if finished.is_set() else None)
            except queue.Empty:
                return
            if ok is None:  # the shares are done (or an earlier point's wake-up)
                continue
            told += 1
            if on_end is not None:
                loop.call_soon_threadsafe(on_end, ok)


_ENDED = None  # in a client process: the queue its requests' ends go to
_STARTED = None  # in a client process: the barrier every process meets once started
_CLIENT = None  # in a client process: (url, timeout, api_key) of the daemon


def _join(ended, started, client) -> None:
    global _ENDED, _STARTED, _CLIENT
    _ENDED, _STARTED, _CLIENT = ended, started, client


def _started(timeout_s: float) -> tuple[int, bool]:
    """(pid, whether the first request was answered), once every process got this far."""
    warmed = uvloop.run(_warm_up(*_CLIENT))
    _STARTED.wait(timeout_s)
    return os.getpid(), warmed


async def _warm_up(url: str, timeout: float, api_key: str | None) -> bool:
    """A first request (GET /health): what a process pays once for its first request (the
    TLS context, the HTTP stack's imports on first use: tens of ms) is paid here, not by the
    first requests of the first point, whose TTFT it would be. Whether it was answered."""
    try:
        async with AsyncDaemonClient(url, timeout, 1, api_key) as client:
            await client.health()
    except (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError):  # the point will tell
        return False
    return True


def _send_share(url, timeout, api_key, prompts, arrivals, workers, start):
    """In a client process: one share of a point (records indexed within the share)."""

    def ended(record: RequestRecord) -> None:
        _ENDED.put(record.ok)

    async def share():
        async with AsyncDaemonClient(url, timeout, workers, api_key) as client:
            return await send(client, prompts, arrivals, workers, ended, start=start)

    return uvloop.run(share())  # the client's event loop: a token costs it less than asyncio's
