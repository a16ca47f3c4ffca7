"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on each request's headers.

uvicorn closes a kept-alive connection that stays silent for `timeout_keep_alive`, but it
stops that timer at the first byte of the next request and has no timer at all before a
connection's first request. A client that opens a connection and sends nothing, or sends its
headers a byte at a time, would hold its socket, its buffers and a place under the connection
cap for as long as it likes. Here the client gets `header_timeout_s` to send the headers of
each request in full, counted from the connection's start and from the end of each answer;
otherwise the connection is closed without an answer. A request whose headers are in is not
limited: streams and slow answers take as long as they take.

uvicorn logs a warning for every malformed request (and every request past the connection
cap), so a client decides how many lines the log gets; here each of its warnings is written at
most once every 10 s, with how many were left out (`QuietLog`).

Every connection has Nagle's algorithm off (TCP_NODELAY). asyncio turns it off only for sockets
it knows to be TCP, and the fronts' accepted sockets come from listening sockets of their own,
which it does not recognise: with Nagle on, a stream's first token, written while the client had
not yet acknowledged the headers written before it, waited for the client's delayed ACK, up to
40 ms of TTFT on a kept-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvferry.transport.log_limit import RateLimitedLog

GONE = 499  # the status of a request whose client left before its answer: answered to nobody


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol whose connections must deliver each request's headers within
    `header_timeout_s` seconds of the connection's start or of the previous answer's end."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _UVICORN_LOG  # passed on to each request's cycle too
        assert header_timeout_s > 0, header_timeout_s
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

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

    def handle_events(self) -> None:
        super().handle_events()
        # h11 leaves IDLE once a request's headers are complete (SEND_BODY, or DONE without
        # a body); it is back in IDLE only when the next request may begin
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        # Armed first: the base class goes on to a pipelined request already buffered, and
        # `handle_events` disarms the timer again once that one's headers are in.
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
