"""A failed request's answer comes from its failure's kind: HTTP status, error type, `code`;
and the client reads the kind back."""

import json

import pytest

from kvferry.daemon.cli.replies import ServerError, error_reason
from kvferry.daemon.server.http_front import HTTPError
from kvferry.transport.failure import Failure, FailureKind


@pytest.mark.parametrize(
    "kind, status, kind_type",
    [
        (FailureKind.TIMEOUT, 504, "timeout"),
        (FailureKind.UNAVAILABLE, 503, "unavailable"),
        (FailureKind.INVALID_REQUEST, 400, "invalid_request_error"),
        *[
            (kind, 502, "server_error")
            for kind in FailureKind
            if kind
            not in (FailureKind.TIMEOUT, FailureKind.UNAVAILABLE, FailureKind.INVALID_REQUEST)
        ],
    ],
)
def test_the_answer_is_derived_from_the_kind_and_read_back(kind, status, kind_type):
    # the detail's wording never decides: "timeout" in the text of a refusal stays a refusal
    error = HTTPError.of(Failure(kind, "timeout: words that must not matter"))
    assert (error.status, error.kind, error.code) == (status, kind_type, kind.value)
    body = error.body()
    assert body["error"] == {
        "message": "timeout: words that must not matter",
        "type": kind_type,
        "code": kind.value,
    }
    reason, code = error_reason(status, json.dumps(body).encode())
    assert code == kind.value and reason.startswith(f"HTTP {status}: timeout: words")
    assert ServerError("http://d", reason, status, code).kind == kind.value


def test_an_answer_without_a_kind_is_named_by_its_status():
    reason, code = error_reason(404, b'{"error": {"message": "no route", "type": "not_found"}}')
    assert (reason, code) == ("HTTP 404: no route", None)
    assert ServerError("http://d", reason, 404, code).kind == "http_404"
    _, code = error_reason(500, b'{"error": {"message": "x", "code": "not a short name!"}}')
    assert code is None
