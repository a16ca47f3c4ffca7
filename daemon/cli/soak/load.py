"""The soak's load: `workers` clients, each sending one request after another until the time is
up, each request drawn afresh (prompt and output lengths, streamed or not, aborted by its client
or not). Every outcome is kept with its start and end, so that a failure can be laid against the
restarts afterwards (injected or not)."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec

from kvferry.daemon.cli.async_client import AsyncDaemonClient
from kvferry.daemon.cli.client import ClientError
from kvferry.daemon.server.api import CompletionRequest

FAILURE_PAUSE_S = (0.1, 0.5)  # a worker's pause after a failed request


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to send, and for how long."""

    duration_s: float
    workers: int = 4
    prompt_len: tuple[int, int] = (1, 200)  # tokens, uniform
    output_len: tuple[int, int] = (1, 64)  # tokens, uniform
    stream_ratio: float = 0.5
    abort_ratio: float = 0.05  # of requests the client leaves before their answer
    abort_after_s: tuple[float, float] = (0.01, 0.5)
    vocab: int = 256
    timeout_s: float = 120.0  # one request, whole
    seed: int = 0


class Outcome(msgspec.Struct, frozen=True):
    start: float  # time.monotonic()
    end: float
    kind: str  # "ok", "aborted" (by its client), or the failure's kind
    detail: str = ""


class Draw(msgspec.Struct, frozen=True):
    request: CompletionRequest
    stream: bool
    abort_after_s: float | None


def draw(rng: random.Random, spec: LoadSpec) -> Draw:
    """One request of the mix."""
    prompt = [rng.randrange(spec.vocab) for _ in range(rng.randint(*spec.prompt_len))]
    request = CompletionRequest(prompt=prompt, max_tokens=rng.randint(*spec.output_len))
    aborted = rng.random() < spec.abort_ratio
    abort_after = rng.uniform(*spec.abort_after_s) if aborted else None
    return Draw(request, rng.random() < spec.stream_ratio, abort_after)


async def run_load(url: str, spec: LoadSpec) -> list[Outcome]:
    """Every request's outcome, in order of their ends."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + spec.duration_s
    async with AsyncDaemonClient(url, spec.timeout_s, spec.workers) as client:
        workers = [
            _worker(client, random.Random(spec.seed * 1000 + i), spec, deadline, outcomes)
            for i in range(spec.workers)
        ]
        await asyncio.gather(*workers)
    return outcomes


async def _worker(client, rng, spec: LoadSpec, deadline: float, outcomes: list) -> None:
    while time.monotonic() < deadline:
        outcome = await _one(client, draw(rng, spec))
        outcomes.append(outcome)
        if outcome.kind not in ("ok", "aborted"):
            # a refusing daemon (restarting, say) answers at once: no spinning on it
            await asyncio.sleep(rng.uniform(*FAILURE_PAUSE_S))


async def _one(client: AsyncDaemonClient, drawn: Draw) -> Outcome:
    start = time.monotonic()
    send = client.stream if drawn.stream else client.complete
    try:
        if drawn.abort_after_s is None:
            await send(drawn.request)
        else:
            await asyncio.wait_for(send(drawn.request), drawn.abort_after_s)
    except (asyncio.TimeoutError, TimeoutError):
        return Outcome(start, time.monotonic(), "aborted")
    except ClientError as exc:
        return Outcome(start, time.monotonic(), exc.kind, exc.reason[:200])
    return Outcome(start, time.monotonic(), "ok")
