"""The decode daemon's front holding 256 streams at once (short answers, the embedded random
model), sent as `kvferry bench` sends them (one asyncio loop, one pool of connections): none
fails, no connection is reset, and every connection is let go afterwards."""

import asyncio
import random
from collections import Counter

import pytest

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.bench.run import send
from kvferry.daemon.cli.bench.workload import random_prompts
from support.cluster import client, decode, prefill, running, wait_for, wait_idle, write
from support.metrics_sim import samples

STREAMS = 256
OUTPUT_TOKENS = 4
SPARE_FDS = 8  # the daemon's descriptors may move a little for reasons of their own


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
