"""Decode: another prefill for a request that failed before any of its KV arrived.

A prefill that refused the prompt, did not answer, or was lost before its first KV byte reached
the decode ranks cost the request nothing but time: it is resubmitted (as a new room, whose
pages are reserved ahead of the queue) to the least-loaded other prefill, while attempts remain
(`scheduler.prefill_attempts`) and its deadline has not passed. The failed prefill backs off. A
transfer that failed after KV started arriving is not retried: it fails as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvferry.daemon.server.prefill_probe import PrefillProbe
from kvferry.daemon.server.request import DecodeRequest
from kvferry.transport.failure import Failure, FailureKind

log = logging.getLogger("kvferry.daemon")
# failures that would recur at any prefill, or that the request's side chose
NOT_RETRIED = frozenset(
    {
        FailureKind.ABORTED,
        FailureKind.INVALID_REQUEST,
        FailureKind.INTERNAL,
        FailureKind.RANK_EXITED,
    }
)


class PrefillRetry:
    """`resubmit(request, prefill)`: the request as a new room at `prefill`; False when it
    ended meanwhile."""

    def __init__(
        self,
        probe: PrefillProbe,
        metrics,
        attempts: int,
        resubmit: Callable[[DecodeRequest, str], bool],
    ) -> None:
        self._probe, self._metrics, self._attempts, self._resubmit = (
            probe, metrics, attempts, resubmit,
        )  # fmt: skip
        # one decision per room: its hand-off and its transfer may both fail it, on two threads
        self._lock = threading.Lock()

    def failed(self, request: DecodeRequest, room: int, failure: Failure) -> Failure | None:
        """`request`'s prefill failed its `room` before any KV arrived. None when it went to
        another prefill (now or already); else the failure to end it with, naming every
        attempt."""
        with self._lock:
            if request.room != room:
                return None  # the other failure of this room moved it on already
            return self._failed(request, failure)

    def _failed(self, request: DecodeRequest, failure: Failure) -> Failure | None:
        prefill = request.prefill
        self._metrics.prefill_backoffs.labels(prefill).inc()
        self._probe.failed(prefill, failure.detail)
        request.attempts.append(f"{prefill}: {failure.detail}")
        if self._may_retry(request, failure):
            other = self._probe.pick(len(request.prompt))
            if other is not None and self._resubmit(request, other):
                self._metrics.prefill_retries.inc()
                log.info("room %#x: retried on %s after %s", request.room, other, failure)
                return None
        if len(request.attempts) == 1:
            return failure
        return Failure(failure.kind, "every prefill tried failed: " + "; ".join(request.attempts))

    def _may_retry(self, request: DecodeRequest, failure: Failure) -> bool:
        return (
            failure.kind not in NOT_RETRIED
            and len(request.attempts) < self._attempts
            and time.monotonic() < request.deadline
        )
