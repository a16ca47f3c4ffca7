"""What a daemon's HTTP replies mean to a client, whatever client sends the requests: the
failures (`ClientError` and its kinds), the server-sent events of a stream read line by line,
and a completion added up event by event. No I/O here: `client.py` (one request at a time) and
`async_client.py` (many streams on one event loop) feed it.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import httpx
import msgspec

from kvferry.daemon.server.os_reason import os_reason


class ClientError(Exception):
    """No usable answer; `reason` says why, the message names the URL as well; `kind` is a
    short fixed name for tables and counts."""

    kind = "connection"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class Unreachable(ClientError):
    """Nothing answered: connection refused, unknown host, no connection within the timeout."""

    kind = "unreachable"


class ConnectionReset(ClientError):
    """The daemon's side closed or reset the connection before the answer was complete."""

    kind = "reset"


class RequestTimeout(ClientError):
    """Connected, but the answer (or the stream's next event) came too late."""

    kind = "client_timeout"


class ServerError(ClientError):
    """The daemon answered with an error: an HTTP error status or an error event in a stream.
    `kind` is the daemon's failure kind (the error's `code`), else `http_<status>`."""

    def __init__(
        self, url: str, reason: str, status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(url, reason)
        self.status = status
        self.kind = code or (f"http_{status}" if status else "server_error")

    @classmethod
    def of_status(cls, url: str, status: int, body: bytes) -> ServerError:
        """The error an answer with an error `status` and `body` means."""
        reason, code = error_reason(status, body)
        return cls(url, reason, status, code)


class Completion(msgspec.Struct, kw_only=True):
    text: str
    token_ids: list[int]
    prompt_tokens: int | None  # None when the daemon sent no usage
    finish_reason: str | None
    ttft_s: (
        float | None
    )  # request sent -> first event carrying tokens, measured here; None unstreamed
    latency_s: float  # request sent -> whole answer
    # the daemon's account of where the time went: stage -> seconds after it got the request
    timeline: dict[str, float] | None = None


@contextmanager
def translated(url: str, timeout: float):
    """httpx's failures as ClientErrors naming the URL: nothing answered (Unreachable), the
    answer stopped coming (RequestTimeout), the connection broke (ConnectionReset)."""
    try:
        yield
    except httpx.ConnectTimeout:
        raise Unreachable(url, "no connection within the timeout") from None
    except httpx.ConnectError as exc:  # refused, unknown host, no route
        raise Unreachable(url, os_reason(exc)) from None
    except (httpx.TimeoutException, TimeoutError, asyncio.TimeoutError):  # a read, the deadline…
        raise RequestTimeout(url, f"no answer within {timeout:g} s") from None
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
        raise ConnectionReset(url, f"connection lost: {os_reason(exc)}") from None
    except httpx.HTTPError as exc:
        raise ClientError(url, f"{type(exc).__name__}: {os_reason(exc)}") from None


class EventReader:
    """A completion stream's server-sent events, fed one line at a time (line ends removed):
    `feed` returns each event's JSON object once its blank line arrives; `done` turns True at
    `data: [DONE]`. Comments and fields other than `data` are skipped; an error event raises
    ServerError."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done = False
        self._data: list[str] = []

    def feed(self, line: str) -> dict | None:
        if self.done:  # what follows [DONE] is not the answer's
            return None
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return None
        if line or not self._data:  # another field, a comment, or a blank line of nothing
            return None
        payload, self._data = "\n".join(self._data), []
        if payload == "[DONE]":
            self.done = True
            return None
        return self._event(payload)

    def ended(self) -> None:
        """The body is over: a ClientError unless [DONE] came."""
        if not self.done:
            raise ConnectionReset(self.url, "the stream ended before [DONE]")

    def _event(self, payload: str) -> dict:
        try:
            event = json.loads(payload)
        except ValueError:
            raise ClientError(self.url, f"not a JSON event: {payload[:200]!r}") from None
        if "error" in event:
            raise ServerError(self.url, _message(event["error"]), code=_code(event["error"]))
        return event


class Tally:
    """Text, token ids and timings of one completion, added up event by event."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.ttft_s: float | None = None
        self.timeline: dict[str, float] | None = None

    def add(self, event: dict, streamed: bool) -> str:
        """Takes one event (or the whole unstreamed answer); returns its new text."""
        choice = (event.get("choices") or [{}])[0]
        text, ids = choice.get("text") or "", choice.get("token_ids") or []
        if streamed and self.ttft_s is None and (text or ids):
            self.ttft_s = time.monotonic() - self.start
        self.text.append(text)
        self.token_ids.extend(ids)
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        usage = event.get("usage") or {}
        self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
        timeline = event.get("timeline")
        if isinstance(timeline, dict):
            self.timeline = {k: v for k, v in timeline.items() if isinstance(v, int | float)}
        return text

    def result(self) -> Completion:
        return Completion(
            text="".join(self.text),
            token_ids=self.token_ids,
            prompt_tokens=self.prompt_tokens,
            finish_reason=self.finish_reason,
            ttft_s=self.ttft_s,
            timeline=self.timeline,
            latency_s=time.monotonic() - self.start,
        )


def json_answer(url: str, raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError(url, f"not a JSON answer: {raw[:200]!r}") from None


def error_reason(status: int, body: bytes) -> tuple[str, str | None]:
    """(`HTTP 400: <message>`, the failure kind if the daemon gave one) from
    {"error": {...}}, {"status": ...} or a plain body."""
    code = None
    try:
        answer = json.loads(body)
        if "error" in answer:
            detail, code = _message(answer["error"]), _code(answer["error"])
        else:
            detail = str(answer["status"])
    except (ValueError, KeyError, TypeError):
        detail = body.decode("utf-8", errors="replace").strip()[:200]
    if not detail:
        detail = httpx.codes.get_reason_phrase(status) or "error"
    return f"HTTP {status}: {detail}", code


def _code(error) -> str | None:
    """The failure kind an error carries (`code`), if it is a short name."""
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code.isidentifier() and len(code) <= 40 else None


def _message(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)
