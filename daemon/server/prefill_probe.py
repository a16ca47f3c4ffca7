"""A decode daemon's prefill daemons: who they are, whether they answer, how loaded they are.

Each configured address may name several hosts (a DNS name, re-resolved every
RESOLVE_INTERVAL_S and after a failure): new prefill daemons join, vanished ones are retired
(requests already handed to them finish there). A background thread asks each bootstrap server
for its ranks (`QueryPeers`) every PROBE_INTERVAL_S; the answer carries the daemon's load. A new
request goes to the least-loaded usable prefill: reachable, and not seen failing within
BACKOFF_S.

Each answer also names the prefill group's incarnation (`transport.directory.incarnation`): when
it changes (a prefill daemon restarted on the same address; its ranks have new addresses) or the
prefill stops answering, `on_incarnation(address, incarnation or None)` is called before the
state says so, and the daemon tells its ranks to drop what they cached of the old one. A request
picked after the new incarnation was seen reaches the ranks after that news (one pipe to rank 0,
read in order), so it never registers its room with the old ranks.

A prefill not probed yet counts as reachable: at start the launcher has just seen it healthy,
and refusing requests until the first probe ends would only add a start-up race.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from kvferry.transport.control import request as control_request
from kvferry.transport.directory import incarnation
from kvferry.transport.messages import Codec, ErrorReply, Peers, PrefillLoad, QueryPeers, WireError
from kvferry.transport.resolve import resolve as resolve_address

log = logging.getLogger("kvferry.daemon")
PROBE_INTERVAL_S = 1.0  # pause between two rounds of probes
PROBE_TIMEOUT_S = 2.0  # longest wait for one bootstrap server's answer
RESOLVE_INTERVAL_S = 10.0  # how often names are looked up again (and after each failure)
BACKOFF_S = 5.0  # a prefill that failed a hand-off gets no new request for this long
MISSES = 2  # probes in a row without an answer before a prefill counts as unreachable


@dataclass
class PrefillState:
    address: str
    reachable: bool | None = None  # None: not probed yet
    last_error: str | None = None
    last_seen: float | None = None  # wall-clock time of the last answer
    load: PrefillLoad | None = None  # from the last answer
    handed_prompts: int = 0  # handed since that answer
    handed_tokens: int = 0
    backoff_until: float = 0.0  # monotonic
    misses: int = 0  # probes in a row it did not answer (a saturated host may miss one)
    last_pick: int = 0  # order of the last pick: ties go to the least recently picked
    incarnation: str | None = None  # of the last answer; None after a miss, or before any

    def usable(self, now: float) -> bool:
        return self.reachable is not False and now >= self.backoff_until

    def queue(self) -> tuple[int, int, int, int]:
        """The sort key of a pick: queued tokens, queued prompts, fewer free pages, staleness."""
        load = self.load or PrefillLoad()
        tokens, prompts = (
            load.prompt_tokens + self.handed_tokens,
            load.prompts + self.handed_prompts,
        )
        return tokens, prompts, -load.free_pages, self.last_pick

    def as_dict(self) -> dict:
        load = self.load or PrefillLoad()
        tokens, prompts, _, _ = self.queue()
        return {
            "address": self.address,
            "reachable": self.reachable,
            "backing_off": time.monotonic() < self.backoff_until,
            "last_error": self.last_error,
            "last_seen": self.last_seen,
            "queued_prompts": prompts,
            "queued_tokens": tokens,
            "free_pages": load.free_pages,
            "incarnation": self.incarnation,
        }


class PrefillProbe:
    def __init__(
        self,
        addresses: list[str],
        context: zmq.Context,
        codec: Codec,
        metrics,
        resolve: Callable[[str], list[str]] = resolve_address,
        on_incarnation: Callable[[str, str | None], None] = lambda address, seen: None,
    ) -> None:
        """`metrics`: the daemon's Metrics (prefill_reachable, prefill_picks by address).
        `on_incarnation(address, incarnation)`: called on the probe's thread when a prefill's
        incarnation changes, with None when it stops answering (see the module's docstring)."""
        self._context, self._codec, self._metrics, self._resolve = context, codec, metrics, resolve
        self._on_incarnation = on_incarnation
        self._specs = list(addresses)
        self._by_spec: dict[str, list[str]] = {spec: [] for spec in self._specs}
        self._states: dict[str, PrefillState] = {}
        self._lock = threading.Lock()  # the states: HTTP threads pick, the probe thread updates
        self._picks = itertools.count(1)
        self._resolved_at = float("-inf")
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvferry-probe", daemon=True)

    def start(self) -> None:
        self._resolve_all()  # the first look-up before any request: IPs resolve at once
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(PROBE_TIMEOUT_S + 1)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pick(self, prompt_tokens: int = 0) -> str | None:
        """The least-loaded usable prefill address, counted as handed `prompt_tokens` until its
        next answer; None when none is usable."""
        now = time.monotonic()
        with self._lock:
            usable = [s for s in self._states.values() if s.usable(now)]
            if not usable:
                return None
            best = min(usable, key=PrefillState.queue)
            best.handed_prompts += 1
            best.handed_tokens += prompt_tokens
            best.last_pick = next(self._picks)
        self._metrics.prefill_picks.labels(best.address).inc()
        return best.address

    def failed(self, address: str, reason: str) -> None:
        """A hand-off to `address` failed: no new request goes there for BACKOFF_S, and names
        are looked up again now."""
        with self._lock:
            state = self._states.get(address)
            if state is not None:
                state.backoff_until = time.monotonic() + BACKOFF_S
                state.last_error = reason
        self._resolved_at = float("-inf")
        self._wake.set()

    def any_usable(self) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(s.usable(now) for s in self._states.values())

    def states(self) -> list[dict]:
        with self._lock:
            return [state.as_dict() for state in self._states.values()]

    def why_none(self) -> str:
        """Why no prefill can be used: each address with its last error."""
        with self._lock:
            if not self._states:
                return "; ".join(f"{spec}: resolves to no address" for spec in self._specs)
            return "; ".join(f"{s.address}: {s.last_error}" for s in self._states.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._resolved_at >= RESOLVE_INTERVAL_S:
                self._resolve_all()
            with self._lock:
                states = list(self._states.values())
            for state in states:
                if self._stop.is_set():
                    return
                self._probe(state)
            self._wake.wait(PROBE_INTERVAL_S)
            self._wake.clear()

    def _resolve_all(self) -> None:
        self._resolved_at = time.monotonic()
        for spec in self._specs:
            try:
                self._by_spec[spec] = self._resolve(spec)
            except (OSError, ValueError) as exc:  # keep what it stood for until it answers
                log.warning("prefill %s: %s (keeping %s)", spec, exc, self._by_spec[spec])
        # in the configured order: equally loaded prefills are picked in it
        current = dict.fromkeys(a for addresses in self._by_spec.values() for a in addresses)
        with self._lock:
            for address in current:
                if address not in self._states:
                    log.info("prefill %s joined", address)
                    self._states[address] = PrefillState(address)
            for address in self._states.keys() - current.keys():
                log.info("prefill %s retired: its name no longer stands for it", address)
                del self._states[address]
                self._metrics.forget_prefill(address)

    def _probe(self, state: PrefillState) -> None:
        error, load, seen = None, None, None
        try:
            reply = control_request(
                self._context, self._codec, state.address, QueryPeers(), PROBE_TIMEOUT_S
            )
            if isinstance(reply, ErrorReply):
                error = f"not ready: {reply.reason}"
            elif isinstance(reply, Peers):
                load, seen = reply.load, incarnation(reply.ranks)
            else:
                error = f"unexpected reply {type(reply).__name__}"
        except (TimeoutError, WireError, zmq.ZMQError) as exc:
            error = str(exc)
        except Exception as exc:  # a probe's surprise must not end the probing
            error = f"{type(exc).__name__}: {exc}"
        if seen != state.incarnation:  # only this thread writes it
            if seen is not None and state.incarnation is not None:
                log.info("prefill %s is a new incarnation (%s)", state.address, seen)
            # before the state below says so: picks from then on come after this news
            self._on_incarnation(state.address, seen)
        self._record(state, error, load, seen)

    def _record(
        self, state: PrefillState, error: str | None, load: PrefillLoad | None, seen: str | None
    ) -> None:
        with self._lock:
            state.incarnation = seen
            state.misses = 0 if error is None else state.misses + 1
            reachable = error is None or (state.misses < MISSES and state.reachable is not False)
            if error is None:
                state.last_seen = time.time()
                state.load, state.handed_prompts, state.handed_tokens = load, 0, 0
            elif not reachable and state.reachable is not False:
                log.warning("prefill %s unreachable: %s", state.address, error)
            if error is None and state.reachable is False:
                log.info("prefill %s reachable again", state.address)
            state.reachable = reachable
            state.last_error = error or state.last_error  # kept after a recovery, for /status
            if state.address not in self._states:
                return  # retired while probed
        self._metrics.prefill_reachable.labels(state.address).set(1 if reachable else 0)
