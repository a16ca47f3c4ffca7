"""uvicorn's HTTP/1.1 protocol (httptools) with a deadline and a size limit on each request's
headers.

The parser is uvicorn's httptools one (llhttp, in C) and the fronts run on uvloop: a streamed
token's way out (the ASGI send, the chunk's framing, the socket write) and a request's way in
cost less host time than on the pure-Python h11 parser and asyncio's own loop, on a thread
that serves every stream of the daemon (`python bench/http_front.py` compares the two).

uvicorn closes a kept-alive connection that stays silent for `timeout_keep_alive`, but it
stops that timer at the first byte of the next request and has no timer at all before a
connection's first request. A client that opens a connection and sends nothing, or sends its
headers a byte at a time, would hold its socket, its buffers and a place under the connection
cap for as long as it likes. Here the client gets `header_timeout_s` to send the headers of
each request in full, counted from the connection's start and from the end of each answer;
otherwise the connection is closed without an answer. A request whose headers are in is not
limited: streams and slow answers take as long as they take. Headers may take MAX_HEADER_BYTES
at most (llhttp has no limit of its own): past that the request gets a 431 and the connection
closes.

uvicorn logs a warning for every malformed request (and every request past the connection
cap), so a client decides how many lines the log gets; here each of its warnings is written at
most once every 10 s, with how many were left out (`QuietLog`).

Each request's scope carries when its headers were in (`ARRIVED`, wall clock): where a streamed
answer's timeline starts its way through the front (`completions.py`).

Every connection has Nagle's algorithm off (TCP_NODELAY), set here whatever the loop does:
with Nagle on, a stream's first token, written while the client had not yet acknowledged the
headers written before it, waits for the client's delayed ACK, up to 40 ms of TTFT on a
kept-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvferry.transport.log_limit import RateLimitedLog

GONE = 499  # the status of a request whose client left before its answer: answered to nobody
MAX_HEADER_BYTES = 64 * 1024  # a request line and headers together (h11's limit is 16 KiB)
LOOP = "uvloop"  # the fronts' event loop (uvicorn.Config's `loop`)
ARRIVED = "kvferry.arrived"  # scope key: time.time() when the request's headers were in
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose connections must deliver each request's headers, at most
    MAX_HEADER_BYTES of them, within `header_timeout_s` seconds of the connection's start or
    of the previous answer's end."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _UVICORN_LOG  # passed on to each request's cycle too
        assert header_timeout_s > 0, header_timeout_s
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes: int | None = 0  # bytes of the awaited headers so far; None: in

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # gone already: connection_lost follows
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # the parser's callbacks run in here
        if self._header_bytes is None or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:  # still no end of the headers in sight
            why = b"request headers over %d bytes" % MAX_HEADER_BYTES
            self.logger.warning("Request headers too large.")
            self.transport.write(_TOO_LARGE % (len(why), why))
            self.transport.close()

    def on_headers_complete(self) -> None:
        # counted from here on by the body's own limits; a pipelined request's headers, in the
        # same bytes as the one before, need no timer either
        self._header_bytes = None
        self._disarm()
        super().on_headers_complete()
        self.scope[ARRIVED] = time.time()

    def on_response_complete(self) -> None:
        # A request pipelined behind this one has its headers in already and starts now;
        # otherwise the next request's headers are awaited from here.
        if not self.pipeline:
            self._header_bytes = 0
            self._arm()
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # connection_lost follows, as for a client that left


class QuietLog:
    """A logger whose warnings are rate-limited per message (`RateLimitedLog`); everything else
    goes to `logger` as it is. For uvicorn's protocol, whose warnings are fixed texts
    ("Invalid HTTP request received.", "Exceeded concurrency limit.") set off by clients."""

    def __init__(self, logger: logging.Logger, limited: RateLimitedLog | None = None) -> None:
        self._logger = logger
        self._limited = limited or RateLimitedLog(logger)

    def warning(self, msg: str, *args, **kwargs) -> None:
        self._limited.warning(msg, msg, *args, exc_info=kwargs.get("exc_info"))

    def __getattr__(self, name: str):
        return getattr(self._logger, name)


_UVICORN_LOG = QuietLog(logging.getLogger("uvicorn.error"))
