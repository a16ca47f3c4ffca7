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

from prometheus_client.parser import text_string_to_metric_families

from kvferry.daemon.client import CompletionRequest, DaemonClient
from kvferry.daemon.launcher import Launcher

SHOWCASE = [
    "The KV cache of a long prompt",
    "Prefill and decode run on different GPUs, so",
    "Heterogeneous tensor parallelism means",
]


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
        client = DaemonClient(decode.url, timeout=300)
        say("\na few completions (streamed):")
        for prompt in SHOWCASE:
            result = client.stream(CompletionRequest(prompt=prompt, max_tokens=16))
            say(f"  {prompt!r} -> {result.text!r}")
            say(f"    token ids {result.token_ids}")
            say(f"    TTFT {result.ttft_s * 1e3:.1f} ms, latency {result.latency_s * 1e3:.1f} ms")
        before = _transfer_counters(launcher)
        say(f"\nburst: {requests} requests, {concurrency} at a time, {max_tokens} tokens each")
        results, wall = _burst(client, requests, concurrency, max_tokens, seed)
        after = _transfer_counters(launcher)
        _summary(say, results, wall, {k: after[k] - before[k] for k in after}, requests)
        say("\nstopping")
        codes = launcher.stop()
    return 0 if all(code == 0 for code in codes.values()) else 1


def _burst(client: DaemonClient, requests: int, concurrency: int, max_tokens: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(16, 400))] for _ in range(requests)]

    def one(prompt):
        return client.stream(CompletionRequest(prompt=prompt, max_tokens=max_tokens))

    began = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    return results, time.monotonic() - began


def _transfer_counters(launcher: Launcher) -> dict[str, float]:
    """KV bytes and data messages received, summed over the decode daemons' ranks."""
    totals = {"bytes": 0.0, "messages": 0.0}
    names = {"kvferry_kv_bytes_received": "bytes", "kvferry_ucx_messages_received": "messages"}
    time.sleep(0.6)  # one snapshot period: the ranks' counters are current
    for child in launcher.children:
        if child.role != "decode":
            continue
        text = DaemonClient(child.url).metrics()
        for family in text_string_to_metric_families(text):
            key = names.get(family.name)
            if key:
                totals[key] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def _summary(say, results, wall: float, moved: dict[str, float], requests: int) -> None:
    tokens = sum(len(r.token_ids) for r in results)
    ttft = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    latency = sorted(r.latency_s for r in results)
    say("\nsummary")
    say(f"  requests           {len(results)} in {wall:.2f} s ({len(results) / wall:.2f} req/s)")
    say(f"  output tokens      {tokens} ({tokens / wall:.1f} tokens/s)")
    say(
        f"  TTFT               mean {_ms(statistics.mean(ttft))}, p50 {_ms(_pct(ttft, 50))}, "
        f"p90 {_ms(_pct(ttft, 90))}"
    )
    say(f"  latency            mean {_ms(statistics.mean(latency))}, p90 {_ms(_pct(latency, 90))}")
    say(
        f"  KV moved           {moved['bytes'] / 2**20:.1f} MiB "
        f"({moved['bytes'] / requests / 2**10:.1f} KiB per request)"
    )
    say(
        f"  UCX messages       {moved['messages']:.0f} ({moved['messages'] / requests:.1f} per "
        "request)"
    )


def _pct(values: list[float], q: int) -> float:
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"
