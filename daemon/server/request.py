"""A request as the daemon sees it: the check of its prompt (decode's HTTP requests and the
prompts decode daemons hand to prefill alike), and a decode request in flight between the HTTP
front and the ranks."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.transport.failure import Failure

if TYPE_CHECKING:
    from kvferry.daemon.server.metrics import Metrics


class Events(Protocol):
    def put(self, item: tuple[list[int], str | None]) -> None: ...


class Unavailable(RuntimeError):
    """The daemon is not taking requests (starting, stopping or broken)."""


def check_prompt(
    prompt: list[int], limit: int, vocab: int, refused: Callable[[str], None] | None = None
) -> None:
    """ValueError, naming the bad value, for a prompt the daemon cannot serve: empty, longer
    than `limit` (scheduler.max_prompt_tokens: `refused` is told), or with a token outside the
    vocabulary."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > limit:
        if refused is not None:
            refused("max_prompt_tokens")
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_prompt_tokens={limit}")
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")


def decode_params(params: SamplingParams, vocab: int) -> SamplingParams:
    """`params` as every rank and the prefill daemon must use them: ValueError for a stop token
    outside the vocabulary; a seed drawn if none was given (all must draw the same numbers)."""
    bad = next((t for t in params.stop_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids: {bad} is outside the vocabulary [0, {vocab})")
    if params.seed is None:
        params = replace(params, seed=secrets.randbits(63))
    return params


@dataclass
class DecodeRequest:
    """`events.put((new tokens, finish reason or None))` feeds the HTTP handler, called from
    the daemon's thread."""

    room: int
    prompt: list[int]
    params: SamplingParams
    prefill: str | None
    events: Events
    created: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish: str | None = None
    error: Failure | None = None
    ended: bool = False  # the front has its answer (a stop string): ending it is no failure
    reserved: bool = False  # its room's pages are reserved on the ranks
    handed_room: int | None = None  # the room whose prompt went to the prefill
    attempts: list[str] = field(default_factory=list)  # each failed prefill and why
    # when each stage ended, wall clock (transport/timeline.py): the daemon's and the ranks'
    marks: dict[str, float] = field(default_factory=lambda: {"received": time.time()})

    def timeline(self) -> dict[str, float]:
        """Each stage's end in seconds after the request was received, in order."""
        start = self.marks["received"]
        ordered = sorted(list(self.marks.items()), key=lambda item: item[1])  # one GIL step
        return {stage: round(at - start, 6) for stage, at in ordered}

    def take(self, tokens: list[int], now: float, metrics: Metrics) -> None:
        """New tokens at `now`: the first ones give the TTFT, later ones the gap since the last
        (divided among them when a step brings several)."""
        if not tokens:
            return
        if self.first_token_at is None:
            self.first_token_at = now
            self.marks["first_token_out"] = time.time()
            metrics.ttft.observe(now - self.created)
        elif self.last_token_at is not None:
            metrics.itl.observe((now - self.last_token_at) / len(tokens))
        self.last_token_at = now
        self.tokens.extend(tokens)


class Requests:
    """A decode daemon's requests in flight, by room. Thread-safe: HTTP threads add them, the
    daemon's loop ends them, a failed hand-off moves one to a new room."""

    def __init__(self) -> None:
        self._by_room: dict[int, DecodeRequest] = {}
        self._lock = threading.Lock()
        self._unreserved = 0  # requests whose room waits for its pages on the ranks

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_room)

    def get(self, room: int) -> DecodeRequest | None:
        return self._by_room.get(room)

    def all(self) -> list[DecodeRequest]:
        with self._lock:
            return list(self._by_room.values())

    def add(self, request: DecodeRequest) -> bool:
        """Under a room id of its own: drawn here, so no two requests share one. Whether its
        prompt may go to its prefill before the ranks reserve its pages (`early`)."""
        with self._lock:
            request.room = self._new_room()
            self._by_room[request.room] = request
            return self._waits_for_pages(request)

    def move(self, request: DecodeRequest) -> bool | None:
        """To a new room (what arrives for the old one is then ignored): None if it ended,
        else whether its prompt may go before its pages are reserved (`early`)."""
        with self._lock:
            if self._by_room.pop(request.room, None) is not request:
                return None
            self._unreserved -= not request.reserved
            request.room = self._new_room()
            self._by_room[request.room] = request
            return self._waits_for_pages(request)

    def reserved(self, request: DecodeRequest) -> None:
        """The ranks reserved the pages of `request`'s room."""
        with self._lock:
            self._unreserved -= not request.reserved
            request.reserved = True

    def remove(self, request: DecodeRequest) -> bool:
        """False when it had ended already: each request ends once."""
        with self._lock:
            if self._by_room.pop(request.room, None) is None:
                return False
            self._unreserved -= not request.reserved
            return True

    def _waits_for_pages(self, request: DecodeRequest) -> bool:
        """Counts `request` among those waiting for their pages; whether it is the only one.
        Its prompt may then go to the prefill at once, in parallel with the reservation (the
        prefill computes it while the registration is on its way); behind others, pages may
        be short and the prompt waits for its own, so that it does not hold the prefill's
        pages for a room the decode side cannot take yet."""
        request.reserved = False
        self._unreserved += 1
        return self._unreserved == 1

    def _new_room(self) -> int:
        room = secrets.randbits(64)
        while room in self._by_room:
            room = secrets.randbits(64)
        return room


class Answering:
    """The HTTP handlers with a request in flight: a daemon's shutdown waits for them."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()  # notified as each of them finishes

    @contextlib.contextmanager
    def one(self):
        """Around an HTTP handler with a request in flight."""
        with self._changed:
            self.count += 1
        try:
            yield
        finally:
            with self._changed:
                self.count -= 1
                self._changed.notify_all()

    def wait_for_none(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self.count, timeout_s)
