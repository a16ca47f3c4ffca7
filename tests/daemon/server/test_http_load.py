"""The decode daemon's front holding 256 streams at once (short answers, the embedded random
model), sent as `kvferry bench` sends them (one asyncio loop, one pool of connections): none
fails, no connection is reset, and every connection is let go afterwards. Then a point spread
over client processes, as `kvferry bench` sends one with many requests in flight."""

import asyncio
import os
import random
import signal
import socket
from collections import Counter

import pytest

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.senders import ClientProcesses, client_processes, send
from kvferry.daemon.cli.bench.workload import BenchError, Prompt, random_prompts
from kvferry.transport.requester import MAX_IDLE_PER_SERVER
from support.cluster import client, decode, prefill, running, wait_for, wait_idle, write
from support.metrics_sim import samples

STREAMS = 256
OUTPUT_TOKENS = 4
# the daemon's descriptors may move a little for reasons of their own, and it keeps up to
# MAX_IDLE_PER_SERVER connections to the prefill it hands prompts to (two descriptors each)
SPARE_FDS = 8 + 2 * MAX_IDLE_PER_SERVER


@pytest.fixture(scope="module")
def load_pair(tmp_path_factory):
    """prefill-0 -> decode-0 with KV pools that hold every stream's prompt at once. A burst
    of new requests hands their prompts to prefill faster than its ranks report the rooms
    registered, so prefill may hold up to all of them unregistered (the default allows 128
    per submitting host: the rest would be refused)."""
    quota = {"max_unregistered_prompts_per_peer": STREAMS, "max_unregistered_prompts": STREAMS}
    p = prefill(
        "prefill-0",
        cache={"page_size": 8, "num_pages": 1024},
        scheduler={"prefill_chunk_tokens": 16, "max_batch_tokens": 512, **quota},
    )
    d = decode(
        "decode-0",
        [p],
        cache={"page_size": 4, "num_pages": 2048},
        scheduler={"max_running": 128},
    )
    path = write(tmp_path_factory.mktemp("load"), [p, d])
    with running(path) as launcher:
        yield launcher


def test_256_concurrent_streams_finish_with_no_failure_and_no_reset(load_pair):
    decoder = client(load_pair, "decode-0")
    before = samples(decoder.metrics())
    prompts = random_prompts(random.Random(0), STREAMS, 16, OUTPUT_TOKENS, 1.0, vocab=256)

    async def all_at_once():
        async with AsyncDaemonClient(decoder.url, 300.0, connections=STREAMS) as http:
            return await send(http, prompts, [0.0] * STREAMS, workers=STREAMS)

    records, _ = asyncio.run(all_at_once())
    failures = Counter(r.error_kind for r in records if not r.ok)
    assert not failures, (failures, next(r.error for r in records if not r.ok))
    assert all(1 <= r.output_tokens <= OUTPUT_TOKENS and r.ttft_s is not None for r in records)
    wait_idle(load_pair, ["decode-0"])
    after = samples(decoder.metrics())
    ok = ("kvferry_requests_total", frozenset({("outcome", "ok")}))
    assert after[ok] - before.get(ok, 0) == STREAMS
    # the client has closed its connections: the daemon holds none of them any more
    fds = ("process_open_fds", frozenset())
    open_fds = lambda: samples(decoder.metrics())[fds]  # noqa: E731
    wait_for(lambda: open_fds() <= before[fds] + SPARE_FDS, "the connections closed", 60)


def test_client_processes_send_every_prompt_once_and_merge_in_prompt_order(load_pair):
    """A point spread over client processes (what `kvferry bench` does past CLIENT_CONCURRENCY
    requests in flight where it has the cores): each prompt sent once, from its own share, the
    records back in prompt order on one clock."""
    decoder = client(load_pair, "decode-0")
    before = samples(decoder.metrics())
    count = 24
    lengths = [1 + i % OUTPUT_TOKENS for i in range(count)]  # tells the records apart
    prompts = [
        Prompt(prompt=[7, 8, 9 + i], input_len=3, output_len=n) for i, n in enumerate(lengths)
    ]
    arrivals = [0.01 * i for i in range(count)]
    processes = ClientProcesses(3, decoder.url, 300.0, None)
    assert len(processes.pids) == 3  # all started, and through their imports, before the point
    assert processes.warmed == 3  # and through a first request
    try:
        ends = []  # what the progress line is told, as requests end
        records, duration = asyncio.run(processes.send(prompts, arrivals, 12, ends.append))
        again, _ = asyncio.run(processes.send(prompts[:5], arrivals[:5], 12, ends.append))
    finally:
        processes.close()
    assert ends == [True] * (count + 5)  # each end told once, in both points
    assert [r.index for r in again] == list(range(5))
    assert [r.index for r in records] == list(range(count))
    assert all(r.ok for r in records), next(r.error for r in records if not r.ok)
    assert [r.output_tokens for r in records] == lengths  # max_tokens, nothing stops sooner
    assert all(r.sent_s >= a for r, a in zip(records, arrivals, strict=True))  # one clock
    assert duration >= max(r.sent_s + r.latency_s for r in records)
    wait_idle(load_pair, ["decode-0"])
    ok = ("kvferry_requests_total", frozenset({("outcome", "ok")}))
    assert samples(decoder.metrics())[ok] - before.get(ok, 0) == count + 5


def test_a_run_spreads_over_client_processes_only_past_one_process_worth():
    assert client_processes(8, cpus=16) == 1
    assert client_processes(32, cpus=16) == 4
    assert client_processes(256, cpus=16) == 4  # a quarter of the cores at most
    assert client_processes(32, cpus=2) == 1


def test_client_processes_start_though_nothing_answers_their_first_request():
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = ClientProcesses(2, f"http://127.0.0.1:{port}", 5.0, None)
    try:
        assert len(processes.pids) == 2 and processes.warmed == 0
    finally:
        processes.close()


def test_a_client_process_that_dies_ends_the_point_with_a_bench_error(load_pair):
    decoder = client(load_pair, "decode-0")
    processes = ClientProcesses(2, decoder.url, 300.0, None)
    try:
        os.kill(next(iter(processes.pids)), signal.SIGKILL)
        prompts = [Prompt(prompt=[7, 8, 9], input_len=3, output_len=1)] * 4
        with pytest.raises(BenchError, match="a client process died"):
            asyncio.run(processes.send(prompts, [0.0] * 4, workers=4))
    finally:
        processes.close()
