"""Request/reply exchanges with a ROUTER server over kept connections (`Requester`): what a
decode daemon hands each prompt to its prefill daemon with."""

from __future__ import annotations

import threading

import zmq

from kvferry.transport.control import dealer, exchange
from kvferry.transport.messages import Codec, Message

# connections a Requester keeps to one server between exchanges; more at once (a burst of
# exchanges in parallel) are closed as they end. Each holds two descriptors (socket, mailbox).
MAX_IDLE_PER_SERVER = 4


class RequesterClosed(RuntimeError):
    """A request after `Requester.close`."""


class Requester:
    """`request` over kept connections: a DEALER per server address and exchange in progress,
    back in a pool once its reply came, so that a server asked once per request (a prefill's
    bootstrap server, by every prompt's hand-off) is not connected to (TCP, ZMTP, CURVE and its
    ZAP check) once per request; up to MAX_IDLE_PER_SERVER of them wait for the next. A socket
    whose exchange failed is closed, the idle ones to its server with it: a reply that comes
    after its timeout must not answer the next request. Thread-safe; a socket moves between
    threads only through the pool's lock."""

    def __init__(self, context: zmq.Context, codec: Codec) -> None:
        self._context, self._codec = context, codec
        self._idle: dict[str, list[zmq.Socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def request(self, address: str, message: Message, timeout_s: float) -> Message:
        """As `request`; RequesterClosed once closed."""
        socket = self._take(address)
        replied = False
        try:
            reply = exchange(socket, self._codec, address, message, timeout_s)
            replied = True
            return reply
        finally:
            self._give(address, socket, replied)

    def close(self) -> None:
        """Close the idle sockets now, those in an exchange as it ends (before the context is
        terminated, which waits for every socket to close)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for sockets in idle.values():
            for socket in sockets:
                socket.close(linger=0)

    def _take(self, address: str) -> zmq.Socket:
        with self._lock:
            if self._closed:
                raise RequesterClosed("the requester is closed")
            idle = self._idle.get(address)
            if idle:
                return idle.pop()
        return dealer(self._context, self._codec, address)

    def _give(self, address: str, socket: zmq.Socket, replied: bool) -> None:
        stale: list[zmq.Socket] = [socket]
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if replied and not self._closed and len(idle) < MAX_IDLE_PER_SERVER:
                idle.append(socket)
                return
            if not replied:  # the server may be gone: its other connections go too
                stale += self._idle.pop(address, [])
        for closing in stale:
            closing.close(linger=0)
