"""What an engine produces each step, for whoever runs it (the rank worker, the tests, the
benchmarks): rooms whose pages or prompts it took on, decode tokens, prefill rooms that left,
and latency samples."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvferry.transport.failure import Failure


@dataclass(frozen=True)
class TokenOutput:
    """Decode: new tokens of room `room`; `finish` once it is over (`error` when it failed)."""

    room: int
    tokens: list[int]
    finish: str | None = None
    error: Failure | None = None
    marks: dict[str, float] | None = None  # with the first token: the transfer's timeline
    # a failed transfer of which no KV reached this rank: another prefill may serve the request
    retryable: bool = False


@dataclass(frozen=True)
class RoomDone:
    """Prefill: a room left this daemon: its KV was delivered, or it failed with `error`."""

    room: int
    error: Failure | None


@dataclass(frozen=True)
class StepOutput:
    """Rank 0's engine output of one step: decode `outputs`; `reserved` rooms (decode: their
    pages are reserved; prefill: every rank's decode peers registered them, their prompts are
    scheduled, if they were not already);
    prefill `done` rooms."""

    outputs: list[TokenOutput] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)
    done: list[RoomDone] = field(default_factory=list)


@dataclass
class Samples:
    """Latency samples an engine collects between snapshots: host time of each forward, and
    each request's transfer (decode: pages reserved to KV on every rank; prefill: last chunk
    computed to delivered on every rank)."""

    forward_s: list[float] = field(default_factory=list)
    transfer_s: list[float] = field(default_factory=list)

    def take(self) -> Samples:
        """What was collected since the last take; starts afresh."""
        taken = Samples(self.forward_s, self.transfer_s)
        self.forward_s, self.transfer_s = [], []
        return taken
