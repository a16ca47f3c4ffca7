"""Sends fuzz frames to one ZeroMQ ROUTER with the sender identity each frame asks for.

A ROUTER learns a sender's identity from its DEALER, set before connecting, so identities are
sockets: one with ZeroMQ's own identity, one fixed `tcp://` identity pointing at a closed port,
and a fresh socket per frame for distinct or garbage identities. Fresh sockets are closed a
few frames later (never more than RECENT_SOCKETS open), so the fuzzer's own fds stay bounded.

Closing hazard (libzmq 4.3.5, `session_base_t::clean_pipes`): once a socket is closed and its
linger is over, its connection can no longer read the rest of a multipart message it has begun
to write; if that connection then breaks (a daemon drops every sender of a part over its size
limit), libzmq asserts and aborts this process. So a socket that sent a multipart message is
closed only once ZeroMQ has let go of the message's last part (a MessageTracker): written,
or dropped with its connection. A socket whose message does not leave within CLOSE_WAIT_S is
kept open, never closed, and counted. A stranger needs none of this: its connections never
pass the handshake, so they never begin to write a message.
"""

from __future__ import annotations

import random
import time
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
CLOSE_WAIT_S = 30.0  # how long closing waits for a multipart message to leave its socket


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
        # the last multipart message sent on a socket: not closed before it has left
        self._multipart: dict[zmq.Socket, zmq.MessageTracker] = {}
        self._closing: list[zmq.Socket] = []  # evicted, waiting for their message to leave
        self.replies: Counter[str] = Counter()
        self.refused = 0  # sends that timed out: the daemon stopped reading this socket

    @property
    def waiting(self) -> int:
        """Sockets due to be closed, kept open until their multipart message has left."""
        return len(self._closing)

    def send(self, frame: Frame) -> bool:
        socket = self._for(frame.identity)
        try:
            tracker = self._send(socket, frame.parts)
        except zmq.Again:
            self.refused += 1
            return False
        if tracker is not None:
            self._multipart[socket] = tracker
        self._close_left()
        self.drain()
        return True

    def close(self) -> int:
        """Close every socket whose multipart messages have left (waiting up to CLOSE_WAIT_S
        in all); the number left open, which the context must not be terminated with."""
        self.drain()
        self._closing += [s for s in (self._default, self._foreign) if not s.closed]
        self._closing += self._recent
        self._recent.clear()
        deadline = time.monotonic() + CLOSE_WAIT_S
        self._closing = [
            s for s in self._closing if not self._close_when_left(s, 0, deadline - time.monotonic())
        ]
        return len(self._closing)

    def _send(self, socket: zmq.Socket, parts: list[bytes]) -> zmq.MessageTracker | None:
        """Send `parts` as one message; a tracker of its last part if it has several (and the
        socket can begin to write it)."""
        if len(parts) == 1 or self._stranger_of is not None:
            socket.send_multipart(parts, copy=False)
            return None
        last = zmq.Frame(parts[-1], copy=False, track=True)  # zero-copy, whatever its size
        return socket.send_multipart([*parts[:-1], last], copy=False)

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
            oldest = self._recent.popleft()
            if not self._close_when_left(oldest, CLOSE_LINGER_MS, CLOSE_WAIT_S):
                self._closing.append(oldest)
        return socket

    def _close_when_left(self, socket: zmq.Socket, linger_ms: int, wait_s: float) -> bool:
        """Close `socket` once its last multipart message has left; False if it did not
        within `wait_s` (then it stays open: see the module docstring)."""
        tracker = self._multipart.get(socket)
        if tracker is not None:
            try:
                tracker.wait(max(wait_s, 0.001))
            except zmq.NotDone:
                return False
            del self._multipart[socket]
        socket.close(linger=linger_ms)
        return True

    def _close_left(self) -> None:
        """Close the sockets kept open before whose message has left since."""
        if self._closing:
            left = [s for s in self._closing if self._multipart[s].done]
            for socket in left:
                self._closing.remove(socket)
                self._close_when_left(socket, 0, 0.0)

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
            if socket.closed:
                continue
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
