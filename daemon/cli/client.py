"""HTTP client of a daemon: /health, /status and /v1/completions, plain or streamed (SSE).

Standard library only. Every wait is bounded by the request's deadline: connecting, sending and
each read. Failures surface as `ClientError`s that name the URL, never as socket exceptions.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import msgspec

from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.config import ConfigError, DaemonConfig

DEFAULT_URL = "http://127.0.0.1:17000"

# A daemon bound to every interface is reached through loopback.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


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


def daemon_url(daemon: DaemonConfig) -> str:
    """Base URL of a daemon's HTTP server, as a client on this host reaches it."""
    if daemon.http_port == 0:
        raise ConfigError(
            f"{daemon.name or daemon.role}: http_port is 0 (any free port), so its URL cannot be "
            "known; set a fixed http_port"
        )
    host = _LOOPBACK.get(daemon.host, daemon.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{daemon.http_port}"


class DaemonClient:
    """Talks to one daemon at `url`; `timeout` bounds each whole request, in seconds."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(url, "not an http:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")

    def health(self) -> dict:
        """GET /health; a daemon that cannot serve now (503: starting, stopping, failed, or
        decode with no reachable prefill) raises ServerError."""
        return self._get("/health")

    def is_ready(self) -> bool:
        """Whether GET /health answers 200: False while the daemon is not listening yet,
        starting or stopping."""
        return self.ready_pid() is not None

    def ready_pid(self) -> int | None:
        """The serving daemon's process id (0 when it does not say), None when not ready."""
        try:
            with self._exchange("GET", "/health", None, time.monotonic() + self.timeout) as r:
                try:
                    return int(r.json().get("pid") or 0)
                except (ClientError, AttributeError, ValueError, TypeError):
                    return 0  # ready, but the answer says nothing of who it is
        except ClientError:
            return None

    def status(self) -> dict:
        return self._get("/status")

    def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        with self._exchange("GET", "/metrics", None, time.monotonic() + self.timeout) as reply:
            return reply.text()

    def complete(self, request: CompletionRequest) -> Completion:
        """One unstreamed completion."""
        start = time.monotonic()
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=False))
        with self._exchange("POST", "/v1/completions", body, start + self.timeout) as reply:
            answer = reply.json()
        tally = _Tally(start)
        tally.add(answer, streamed=False)
        return tally.result()

    def stream(
        self, request: CompletionRequest, on_text: Callable[[str], None] | None = None
    ) -> Completion:
        """A streamed completion; `on_text` gets each piece of new text as it arrives."""
        start = time.monotonic()
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=True))
        tally = _Tally(start)
        with self._exchange("POST", "/v1/completions", body, start + self.timeout) as reply:
            for event in reply.events():
                text = tally.add(event, streamed=True)
                if text and on_text is not None:
                    on_text(text)
        return tally.result()

    def _get(self, path: str) -> dict:
        with self._exchange("GET", path, None, time.monotonic() + self.timeout) as reply:
            return reply.json()

    @contextmanager
    def _exchange(self, method: str, path: str, body: bytes | None, deadline: float):
        """One request on its own connection, yielding its 2xx reply; closed on the way out."""
        conn_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_class(self._host, self._port, timeout=_left(deadline))
        try:
            try:
                conn.connect()
            except OSError as exc:  # refused, unknown host, no route, connect timed out
                raise Unreachable(self.url, _os_reason(exc)) from None
            # Kept: the connection drops its own reference once the response owns the socket.
            sock = conn.sock
            with _translated(self.url, self.timeout):
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn.request(method, self._prefix + path, body=body, headers=headers)
                sock.settimeout(_left(deadline))
                response = conn.getresponse()
                if not 200 <= response.status < 300:
                    reason, code = _error_reason(response.status, response.read())
                    raise ServerError(self.url, reason, response.status, code)
            yield _Reply(self.url, self.timeout, response, sock, deadline)
        finally:
            conn.close()


class _Reply:
    """An open 2xx response; every read waits at most until the request's deadline."""

    def __init__(self, url, timeout, response, sock, deadline) -> None:
        self.url, self.timeout = url, timeout
        self._response, self._sock, self._deadline = response, sock, deadline

    def text(self) -> str:
        with _translated(self.url, self.timeout):
            self._sock.settimeout(_left(self._deadline))
            return self._response.read().decode()

    def json(self) -> dict:
        raw = self.text()
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(self.url, f"not a JSON answer: {raw[:200]!r}") from None

    def events(self) -> Iterator[dict]:
        """The stream's JSON events up to `data: [DONE]`; an error event raises ServerError."""
        data: list[str] = []
        while True:
            line = self._readline()
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:  # a blank line ends an event
                payload, data = "\n".join(data), []
                if payload == "[DONE]":
                    return
                yield self._event(payload)

    def _event(self, payload: str) -> dict:
        try:
            event = json.loads(payload)
        except ValueError:
            raise ClientError(self.url, f"not a JSON event: {payload[:200]!r}") from None
        if "error" in event:
            raise ServerError(self.url, _message(event["error"]), code=_code(event["error"]))
        return event

    def _readline(self) -> str:
        with _translated(self.url, self.timeout):
            self._sock.settimeout(_left(self._deadline))
            raw = self._response.readline()
        if not raw:
            raise ClientError(self.url, "the stream ended before [DONE]")
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")


class _Tally:
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


@contextmanager
def _translated(url: str, timeout: float):
    """Socket and protocol failures after connecting, as ClientErrors naming the URL."""
    try:
        yield
    except TimeoutError:
        raise RequestTimeout(url, f"no answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(url, f"connection lost: {_os_reason(exc)}") from None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:  # settimeout(0) would mean non-blocking, not "already late"
        raise TimeoutError
    return left


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no connection within the timeout"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _error_reason(status: int, body: bytes) -> tuple[str, str | None]:
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
    return f"HTTP {status}: {detail or http.client.responses.get(status, 'error')}", code


def _code(error) -> str | None:
    """The failure kind an error carries (`code`), if it is a short name."""
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code.isidentifier() and len(code) <= 40 else None


def _message(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)
