"""What `kvferry bench` sends: prompts and output lengths (random token ids or a ShareGPT-style
file) and when it sends them (all at once, or Poisson arrivals). Plain Python, seeded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec


class BenchError(Exception):
    """A benchmark that cannot run or a result file that cannot be read; names the culprit."""


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    """One request to send: token ids or text, and the number of tokens to ask for."""

    prompt: str | list[int]
    input_len: int  # tokens for ids; UTF-8 bytes for text (the daemon's usage says the truth)
    output_len: int


def sample_length(rng: random.Random, length: int, range_ratio: float) -> int:
    """Uniform in [length * range_ratio, length], at least 1."""
    assert length >= 1 and 0 <= range_ratio <= 1, (length, range_ratio)
    return rng.randint(max(1, int(length * range_ratio)), length)


def random_prompts(
    rng: random.Random, count: int, input_len: int, output_len: int, range_ratio: float, vocab: int
) -> list[Prompt]:
    """`count` prompts of random token ids in [0, vocab), lengths drawn with `sample_length`."""
    prompts = []
    for _ in range(count):
        n = sample_length(rng, input_len, range_ratio)
        ids = [rng.randrange(vocab) for _ in range(n)]
        prompts.append(
            Prompt(prompt=ids, input_len=n, output_len=sample_length(rng, output_len, range_ratio))
        )
    return prompts


def load_sharegpt(path: str | Path, output_len: int) -> list[Prompt]:
    """The usable entries of a ShareGPT-style file: the first human turn is the prompt (text); the
    gpt turn after it sets the output length (its UTF-8 bytes, capped by `output_len`). Entries
    without both turns are skipped; a file with none left is a BenchError."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: cannot read a JSON dataset: {exc}") from None
    if not isinstance(entries, list):
        raise BenchError(f"{path}: expected a JSON list of conversations")
    prompts = [p for p in (_conversation(e, output_len) for e in entries) if p is not None]
    if not prompts:
        raise BenchError(f"{path}: no entry has both a human and a gpt turn")
    return prompts


def _conversation(entry, output_len: int) -> Prompt | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    texts = [
        (t.get("from"), t.get("value"))
        for t in turns
        if isinstance(t, dict) and isinstance(t.get("value"), str) and t["value"]
    ]
    human = next((i for i, (who, _) in enumerate(texts) if who == "human"), None)
    if human is None:
        return None
    answer = next((text for who, text in texts[human + 1 :] if who == "gpt"), None)
    if answer is None:
        return None
    prompt = texts[human][1]
    wanted = min(len(answer.encode("utf-8")), output_len)
    return Prompt(prompt=prompt, input_len=len(prompt.encode("utf-8")), output_len=wanted)


def dataset_prompts(rng: random.Random, entries: list[Prompt], count: int) -> list[Prompt]:
    """`count` entries drawn without replacement while the file has enough, then with."""
    if count <= len(entries):
        return rng.sample(entries, count)
    return [rng.choice(entries) for _ in range(count)]


def poisson_schedule(rate: float, count: int, seed: int) -> list[float]:
    """Send times in seconds from the point's start: the first at 0, then exponential gaps of
    mean 1/rate. The same seed gives the same schedule."""
    assert rate > 0, rate
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times
