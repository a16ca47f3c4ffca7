"""HTTP client of a daemon: /health, /status, /metrics and /v1/completions, plain or streamed
(SSE), one request at a time per thread.

A `DaemonClient` keeps one pool of connections (httpx) that its requests reuse while the daemon
keeps them alive; close it, or use it in a `with` block, when done. `timeout` bounds each
request: connecting, sending and each read wait at most what is left of it, and a stream that
keeps sending is given up once it has run out. Failures surface as `ClientError`s that name the
URL (replies.py), never as httpx's or the socket's exceptions.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import msgspec

from kvferry.daemon.cli.api_key import bearer
from kvferry.daemon.cli.replies import (
    ClientError,
    Completion,
    ConnectionReset,
    EventReader,
    RequestTimeout,
    ServerError,
    Tally,
    Unreachable,
    json_answer,
    translated,
)
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.config import ConfigError, DaemonConfig, RouterConfig

__all__ = [
    "DEFAULT_URL",
    "ClientError",
    "Completion",
    "ConnectionReset",
    "DaemonClient",
    "RequestTimeout",
    "ServerError",
    "Unreachable",
    "base_url",
    "daemon_url",
]

DEFAULT_URL = "http://127.0.0.1:17000"
JSON_BODY = {"Content-Type": "application/json"}
# An idle pooled connection is dropped after this, well before a daemon closes it (5 s idle):
# reusing one just as the daemon closes it would fail the request on a reset connection.
KEEPALIVE_EXPIRY_S = 2.0

# A daemon bound to every interface is reached through loopback.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def daemon_url(daemon: DaemonConfig | RouterConfig) -> str:
    """Base URL of a daemon's (or a router's) HTTP server, as a client on this host reaches
    it."""
    if daemon.http_port == 0:
        raise ConfigError(
            f"{daemon.name or daemon.role}: http_port is 0 (any free port), so its URL cannot be "
            "known; set a fixed http_port"
        )
    host = _LOOPBACK.get(daemon.host, daemon.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{daemon.http_port}"


def base_url(url: str) -> str:
    """`url` without a trailing slash; ClientError unless it is an http(s):// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(url, "not an http:// URL")
    return url.rstrip("/")


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every client of the process: httpx would build (and load
    the CA certificates of) one per client otherwise, tens of milliseconds each."""
    return ssl.create_default_context()


class DaemonClient:
    """Talks to one daemon at `url`; `timeout` bounds each whole request, in seconds."""

    def __init__(
        self, url: str = DEFAULT_URL, timeout: float = 120.0, api_key: str | None = None
    ) -> None:
        """`api_key`: sent with every request (a daemon asks it of `/v1/*` only)."""
        self.url = base_url(url)
        self.timeout = timeout
        # No cap on connections: the callers' threads are the cap. No proxies from the
        # environment: a daemon is reached directly.
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=32, keepalive_expiry=KEEPALIVE_EXPIRY_S
        )
        self._http = httpx.Client(
            base_url=self.url,
            limits=limits,
            headers=bearer(api_key),
            verify=tls_context(),
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
            with self._exchange("GET", "/health") as reply:
                raw = reply.read()
        except ClientError:
            return None
        try:
            return int(json_answer(self.url, raw).get("pid") or 0)
        except (ClientError, AttributeError, ValueError, TypeError):
            return 0  # ready, but the answer says nothing of who it is

    def status(self) -> dict:
        return self._get("/status")

    def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        with self._exchange("GET", "/metrics") as reply:
            return reply.read().decode()

    def complete(self, request: CompletionRequest) -> Completion:
        """One unstreamed completion."""
        start = time.monotonic()
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=False))
        with self._exchange("POST", "/v1/completions", body, start) as reply:
            answer = json_answer(self.url, reply.read())
        tally = Tally(start)
        tally.add(answer, streamed=False)
        return tally.result()

    def chat(self, messages: list[dict], max_tokens: int = 64) -> str:
        """One unstreamed, greedy chat answer (POST /v1/chat/completions): its text."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        with self._exchange("POST", "/v1/chat/completions", msgspec.json.encode(body)) as reply:
            answer = json_answer(self.url, reply.read())
        try:
            return answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServerError(self.url, f"not a chat answer: {answer!r}", 200) from None

    def stream(
        self, request: CompletionRequest, on_text: Callable[[str], None] | None = None
    ) -> Completion:
        """A streamed completion; `on_text` gets each piece of new text as it arrives."""
        start = time.monotonic()
        body = msgspec.json.encode(msgspec.structs.replace(request, stream=True))
        tally, reader = Tally(start), EventReader(self.url)
        with self._exchange("POST", "/v1/completions", body, start) as reply:
            # read to the end of the body, not only to [DONE]: the connection goes back to
            # the pool only once its answer is read in full
            for line in reply.iter_lines():
                event = reader.feed(line)
                if event is not None:
                    text = tally.add(event, streamed=True)
                    if text and on_text is not None:
                        on_text(text)
                if time.monotonic() - start > self.timeout:
                    raise RequestTimeout(self.url, f"no answer within {self.timeout:g} s")
        reader.ended()
        return tally.result()

    def _get(self, path: str) -> dict:
        with self._exchange("GET", path) as reply:
            return json_answer(self.url, reply.read())

    @contextmanager
    def _exchange(
        self, method: str, path: str, body: bytes | None = None, start: float | None = None
    ):
        """One request on a pooled connection, yielding its 2xx response while the body comes
        in; an error status raises ServerError. Reading the body inside the block is bounded
        and translated like the request itself."""
        start = time.monotonic() if start is None else start
        left = start + self.timeout - time.monotonic()
        headers = JSON_BODY if body is not None else None
        with translated(self.url, self.timeout):
            if left <= 0:
                raise TimeoutError
            with self._http.stream(
                method, path, content=body, headers=headers, timeout=left
            ) as reply:
                if not reply.is_success:
                    raise ServerError.of_status(self.url, reply.status_code, reply.read())
                yield reply
