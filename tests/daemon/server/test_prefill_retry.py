"""When a decode request goes to another prefill: the policy of prefill_retry.py, with the
prefill choice and the resubmission stubbed (this module's unit tests)."""

import time

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.server.metrics import Metrics
from kvferry.daemon.server.prefill_retry import PrefillRetry
from kvferry.daemon.server.request import DecodeRequest
from kvferry.transport.failure import Failure, FailureKind

LOST = Failure(FailureKind.PEER_LOST, "silent for over 2s")


class Prefills:
    """Hands out the prefills not failed yet, in order."""

    def __init__(self, *addresses: str) -> None:
        self.left, self.failed_ones = list(addresses), []

    def failed(self, address: str, reason: str) -> None:
        self.failed_ones.append(address)
        if address in self.left:
            self.left.remove(address)

    def pick(self, prompt_tokens: int = 0) -> str | None:
        return self.left[0] if self.left else None


def setup(*addresses, attempts=3):
    prefills, moves = Prefills(*addresses), []

    def resubmit(request, prefill):
        request.room += 1  # a new room, as the daemon's table draws one
        request.prefill = prefill
        moves.append(prefill)
        return True

    request = DecodeRequest(7, [1, 2, 3], SamplingParams(4), addresses[0], events=None)
    request.deadline = time.monotonic() + 60
    retry = PrefillRetry(prefills, Metrics("decode", "t"), attempts, resubmit)
    return retry, request, prefills, moves


def test_a_request_lost_before_its_kv_goes_to_the_next_prefill():
    retry, request, prefills, moves = setup("A", "B")
    assert retry.failed(request, 7, LOST) is None
    assert (moves, request.prefill, prefills.failed_ones) == (["B"], "B", ["A"])


def test_the_same_room_failing_twice_moves_it_once():
    """Its hand-off and its transfer may both fail a room, on two threads."""
    retry, request, _, moves = setup("A", "B", "C")
    assert retry.failed(request, 7, LOST) is None
    assert retry.failed(request, 7, Failure(FailureKind.REFUSED, "refused")) is None
    assert moves == ["B"] and request.attempts == ["A: silent for over 2s"]


def test_what_would_fail_anywhere_is_not_retried():
    retry, request, _, moves = setup("A", "B")
    invalid = Failure(FailureKind.INVALID_REQUEST, "prompt too long")
    assert retry.failed(request, 7, invalid) is invalid and moves == []


def test_the_last_attempt_fails_naming_every_prefill_tried():
    retry, request, _, _ = setup("A", "B", "C", attempts=2)
    assert retry.failed(request, 7, LOST) is None
    told = retry.failed(request, 8, Failure(FailureKind.REFUSED, "stopping"))
    assert told.kind is FailureKind.REFUSED
    assert told.detail == "every prefill tried failed: A: silent for over 2s; B: stopping"


def test_no_retry_past_the_deadline_or_without_another_prefill():
    retry, request, _, moves = setup("A", "B")
    request.deadline = time.monotonic() - 1
    assert retry.failed(request, 7, LOST) is LOST
    retry, request, _, moves = setup("A")
    assert retry.failed(request, 7, LOST) is LOST and moves == []
