"""Sends fuzz frames to one ZeroMQ ROUTER with the sender identity each frame asks for.

A ROUTER learns a sender's identity from its DEALER, set before connecting, so identities are
sockets: one with ZeroMQ's own identity, one fixed `tcp://` identity pointing at a closed port,
and a fresh socket per frame for distinct or garbage identities. Fresh sockets are closed a
few frames later (never more than RECENT_SOCKETS open), so the fuzzer's own fds stay bounded.
"""

from __future__ import annotations

import random
from collections import Counter, deque

import zmq

from kvferry.daemon.cli.fuzz.frames import Frame
from kvferry.daemon.cli.fuzz.values import closed_address
from kvferry.transport.messages import Codec, WireError

RECENT_SOCKETS = 32
SEND_TIMEOUT_MS = 2000  # a ROUTER that stops reading shows up as refused sends, not a hang
STRANGER_SEND_TIMEOUT_MS = 100
SEND_HWM = 100  # messages queued per socket at most (some are tens of MiB)
CLOSE_LINGER_MS = 200  # a fresh socket's frame gets this long to leave once it is closed


class ZmqFuzzer:
    def __init__(
        self, context: zmq.Context, address: str, seed: int, stranger_of: bytes | None = None
    ) -> None:
        """`stranger_of`: the public key of a deployment this fuzzer has no secret key of: every
        frame goes out on a fresh socket (a new handshake, refused), plain or CURVE with a key
        pair of its own in turn, so no refused queue fills and blocks the sender."""
        self.address, self._stranger_of = address, stranger_of
        self._context = context
        self._rng = random.Random(seed)
        self._codec = Codec(1 << 30)
        self._default = self._socket(None)
        self._foreign = self._socket(closed_address().encode())
        self._recent: deque[zmq.Socket] = deque()
        self.replies: Counter[str] = Counter()
        self.refused = 0  # sends that timed out: the daemon stopped reading this socket

    def send(self, frame: Frame) -> bool:
        socket = self._for(frame.identity)
        try:
            socket.send_multipart(frame.parts, copy=False)
        except zmq.Again:
            self.refused += 1
            return False
        self.drain()
        return True

    def close(self) -> None:
        self.drain()
        for socket in (self._default, self._foreign, *self._recent):
            socket.close(linger=0)
        self._recent.clear()

    def _for(self, identity: str) -> zmq.Socket:
        if self._stranger_of is not None:
            return self._fresh(None if identity == "default" else closed_address().encode())
        if identity == "default":
            return self._default
        if identity == "foreign":
            return self._foreign
        if identity == "distinct":
            name = closed_address().encode()
        else:  # garbage; ZeroMQ reserves identities that start with a zero byte
            name = bytes([self._rng.randint(1, 255)]) + self._rng.randbytes(
                self._rng.randint(0, 254)
            )
        return self._fresh(name)

    def _fresh(self, name: bytes | None) -> zmq.Socket:
        """A socket for one frame, closed RECENT_SOCKETS frames later."""
        socket = self._socket(name)
        self._recent.append(socket)
        if len(self._recent) > RECENT_SOCKETS:
            self._recent.popleft().close(linger=CLOSE_LINGER_MS)
        return socket

    def _socket(self, identity: bytes | None) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        if identity is not None:
            socket.setsockopt(zmq.IDENTITY, identity)
        socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        socket.setsockopt(zmq.RCVHWM, 1000)
        if self._stranger_of is not None:
            # refused once is enough: no reconnects while the socket waits to be closed, and a
            # frame that cannot be queued once the refusal came is counted, not waited on
            socket.setsockopt(zmq.RECONNECT_IVL, -1)
            socket.setsockopt(zmq.SNDTIMEO, STRANGER_SEND_TIMEOUT_MS)
            if self._rng.random() < 0.5:  # knows the public key, not the secret
                socket.curve_serverkey = self._stranger_of
                socket.curve_publickey, socket.curve_secretkey = zmq.curve_keypair()
        socket.connect(self.address)
        return socket

    def drain(self) -> None:
        """Count the answers waiting on the long-lived sockets (the bootstrap server answers
        every frame on the same connection; ranks answer tcp:// identities on their own)."""
        for socket in (self._default, self._foreign):
            while True:
                try:
                    parts = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.replies[self._kind(parts)] += 1

    def _kind(self, parts: list[bytes]) -> str:
        if len(parts) != 1:
            return f"{len(parts)} parts"
        try:
            return type(self._codec.decode(parts[0])).__name__
        except WireError:
            return "undecodable"
