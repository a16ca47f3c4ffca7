"""Which of a decode daemon's prefill daemons can be reached: a background thread asks each
bootstrap server for its ranks (`QueryPeers`) every few seconds, and new requests go round-robin
to those that answered.

A prefill not probed yet counts as reachable: at start the launcher has just seen it healthy,
and refusing requests until the first probe ends would only add a start-up race.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import zmq

from kvferry.transport.control import request as control_request
from kvferry.transport.messages import Codec, ErrorReply, Peers, QueryPeers, WireError

log = logging.getLogger("kvferry.daemon")
PROBE_INTERVAL_S = 2.0  # pause between two rounds of probes
PROBE_TIMEOUT_S = 2.0  # longest wait for one bootstrap server's answer


@dataclass
class PrefillState:
    address: str
    reachable: bool | None = None  # None: not probed yet
    last_error: str | None = None
    last_seen: float | None = None  # wall-clock time of the last answer

    def as_dict(self) -> dict:
        return {
            "address": self.address,
            "reachable": self.reachable,
            "last_error": self.last_error,
            "last_seen": self.last_seen,
        }


class PrefillProbe:
    def __init__(self, addresses: list[str], context: zmq.Context, codec: Codec, gauge) -> None:
        """`gauge`: a labelled metric set to 1/0 per address after each probe."""
        self._context, self._codec, self._gauge = context, codec, gauge
        self._states = [PrefillState(address) for address in addresses]
        self._lock = threading.Lock()  # the states, read by HTTP threads
        self._turn = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvferry-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(PROBE_TIMEOUT_S + 1)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pick(self) -> str | None:
        """The next prefill address, round-robin over the usable ones (not known to be
        unreachable); None when none is."""
        usable = self._usable()
        return usable[next(self._turn) % len(usable)] if usable else None

    def any_usable(self) -> bool:
        return bool(self._usable())

    def _usable(self) -> list[str]:
        with self._lock:
            return [s.address for s in self._states if s.reachable is not False]

    def states(self) -> list[dict]:
        with self._lock:
            return [state.as_dict() for state in self._states]

    def why_none(self) -> str:
        """Why no prefill can be reached: each address with its last error."""
        with self._lock:
            return "; ".join(f"{s.address}: {s.last_error}" for s in self._states)

    def _run(self) -> None:
        while not self._stop.is_set():
            for state in self._states:
                if self._stop.is_set():
                    return
                self._probe(state)
            self._stop.wait(PROBE_INTERVAL_S)

    def _probe(self, state: PrefillState) -> None:
        error = None
        try:
            reply = control_request(
                self._context, self._codec, state.address, QueryPeers(), PROBE_TIMEOUT_S
            )
            if isinstance(reply, ErrorReply):
                error = f"not ready: {reply.reason}"
            elif not isinstance(reply, Peers):
                error = f"unexpected reply {type(reply).__name__}"
        except (TimeoutError, WireError, zmq.ZMQError) as exc:
            error = str(exc)
        except Exception as exc:  # a probe's surprise must not end the probing
            error = f"{type(exc).__name__}: {exc}"
        self._record(state, error)

    def _record(self, state: PrefillState, error: str | None) -> None:
        with self._lock:
            if error is None:
                state.last_seen = time.time()
            elif state.reachable is not False:
                log.warning("prefill %s unreachable: %s", state.address, error)
            if error is None and state.reachable is False:
                log.info("prefill %s reachable again", state.address)
            state.reachable = error is None
            state.last_error = error or state.last_error  # kept after a recovery, for /status
        self._gauge.labels(state.address).set(1 if error is None else 0)
