"""`kvferry demo`: the whole path on this machine — start a deployment, generate a few
completions, fire a burst of concurrent requests, print a summary, stop everything.

The summary's transfer figures come from the daemons' own metrics (scraped before and after the
burst), so they count what crossed the data plane, not what the client thinks it asked for.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvferry.daemon.cli.bench.report import Counters, percentile
from kvferry.daemon.cli.bench.run import scrape
from kvferry.daemon.cli.client import DaemonClient
from kvferry.daemon.cli.launcher import Launcher
from kvferry.daemon.server.api import CompletionRequest

SHOWCASE = [
    "The KV cache of a long prompt",
    "Prefill and decode run on different GPUs, so",
    "Heterogeneous tensor parallelism means",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def run_demo(
    config_path: str,
    requests: int = 24,
    concurrency: int = 8,
    max_tokens: int = 32,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> int:
    """Run the demo; the exit code (0 when every daemon stopped cleanly)."""
    launcher = Launcher.from_file(config_path, log=lambda line: say(f"  {line}"))
    with launcher:
        say(f"starting {config_path}")
        launcher.start()
        decode = next(c for c in launcher.children if c.role == "decode")
        with DaemonClient(decode.url, timeout=300) as client:
            _showcase(client, say)
            decode_urls = [child.url for child in launcher.children if child.role == "decode"]
            before = scrape(decode_urls)
            say(f"\nburst: {requests} requests, {concurrency} at a time, {max_tokens} tokens each")
            results, wall = _burst(client, requests, concurrency, max_tokens, seed)
            moved = scrape(decode_urls).since(before)
            _summary(say, results, wall, moved, requests)
        say("\nstopping")
        codes = launcher.stop()
    return 0 if all(code == 0 for code in codes.values()) else 1


def _showcase(client: DaemonClient, say: Callable[[str], None]) -> None:
    say("\na few completions (streamed):")
    for prompt in SHOWCASE:
        result = client.stream(CompletionRequest(prompt=prompt, max_tokens=16))
        say(f"  {prompt!r} -> {result.text!r}")
        say(f"    token ids {result.token_ids}")
        say(f"    TTFT {result.ttft_s * 1e3:.1f} ms, latency {result.latency_s * 1e3:.1f} ms")
    say("\na chat answer (/v1/chat/completions, the model's chat template):")
    say(f"  {CHAT[0]['content']!r}")
    say(f"  -> {client.chat(CHAT, max_tokens=48)!r}")


def _burst(client: DaemonClient, requests: int, concurrency: int, max_tokens: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(16, 256))] for _ in range(requests)]

    def one(prompt):
        return client.stream(CompletionRequest(prompt=prompt, max_tokens=max_tokens))

    began = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    return results, time.monotonic() - began


def _summary(say, results, wall: float, moved: Counters, requests: int) -> None:
    tokens = sum(len(r.token_ids) for r in results)
    ttft = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    latency = sorted(r.latency_s for r in results)
    say("\nsummary")
    say(f"  requests           {len(results)} in {wall:.2f} s ({len(results) / wall:.2f} req/s)")
    say(f"  output tokens      {tokens} ({tokens / wall:.1f} tokens/s)")
    say(
        f"  TTFT               mean {_ms(statistics.mean(ttft))}, "
        f"p50 {_ms(percentile(ttft, 50))}, p90 {_ms(percentile(ttft, 90))}"
    )
    say(
        f"  latency            mean {_ms(statistics.mean(latency))}, "
        f"p90 {_ms(percentile(latency, 90))}"
    )
    say(
        f"  KV moved           {moved.kv_bytes / 2**20:.1f} MiB "
        f"({moved.kv_bytes / requests / 2**10:.1f} KiB per request)"
    )
    say(f"  UCX messages       {moved.messages:.0f} ({moved.messages / requests:.1f} per request)")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"
