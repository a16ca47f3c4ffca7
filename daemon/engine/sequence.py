"""One request's state on a rank: its tokens, how far its KV is computed, why it finished.
Other parts update it; nobody copies it. Plain Python: no torch here."""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass

_ids = itertools.count(1)
SEED_LIMIT = 1 << 64  # seeds travel to prefill as u64 and seed torch generators


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # sampling one of these ends the sequence, as EOS does

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        # `not` of a positive test: NaN fails every comparison, so it is refused too
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed={self.seed} must be in [0, 2^64)")


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self, prompt: list[int], params: SamplingParams, eos_ids: frozenset[int] = frozenset()
    ) -> None:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.output: list[int] = []
        self.params, self.eos_ids = params, eos_ids
        self.status = SeqStatus.WAITING
        self.num_computed = 0  # leading tokens whose KV is in the cache
        self.in_flight = 0  # tokens sampled on the device that the host has not seen yet
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output) + self.in_flight

    @property
    def generated(self) -> int:
        """Output tokens, counting those still in flight."""
        return len(self.output) + self.in_flight

    @property
    def num_prompt(self) -> int:
        return len(self.prompt)

    @property
    def prompt_left(self) -> int:
        return max(self.num_prompt - self.num_computed, 0)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append(self, token: int) -> None:
        """Record a sampled token; finishes the sequence on EOS or a stop token, or at
        max_tokens."""
        self.output.append(token)
        if token in self.eos_ids or token in self.params.stop_ids:
            self.finish("stop")
        elif len(self.output) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.status, self.finish_reason = SeqStatus.FINISHED, reason
