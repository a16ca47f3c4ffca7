"""ZeroMQ control channel of one rank: one inbound ROUTER, one outbound DEALER per proven peer.

Knows nothing of message types: it moves frames through a Codec. A DEALER's identity is its
owner's own inbound address, so the receiving ROUTER learns who sent each frame. Owned by the
agent thread that created its sockets' traffic (ZeroMQ sockets are not thread-safe).

Anyone can connect to the ROUTER, so an identity is only a claim: a frame is answered over the
ROUTER, back along the connection it came in on (dropped if that is gone), and an outbound socket
is opened only for a peer its owner has checked (`open`). Outbound sockets are capped and
reclaimed once idle. Every socket that receives refuses a message part over the frame limit
before reading it (ZMQ_MAXMSGSIZE); a message of several parts is read one part at a time and
refused (only its first parts are kept; ZeroMQ itself has queued all of them by then).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvferry.transport import curve
from kvferry.transport.messages import Codec, Message, WireError, multipart_error

MAX_PEERS = 256  # outbound sockets per rank (each holds file descriptors while open)
MAX_FRAMES_PER_TURN = 1024  # bounds one turn's reading, so a flood cannot starve the rest
RECONNECT_IVL_MAX_MS = 1000  # back off reconnecting to a peer that is not there
Watch = Callable[[zmq.Socket, bool], None]  # (socket, True: poll it / False: stop polling it)


class PeerLimitError(RuntimeError):
    """No outbound socket can be opened to a new peer: the rank talks to too many already."""


def identity(peer: str) -> bytes:
    """The ZeroMQ routing identity behind a peer name made by `peer_name`."""
    return peer.encode("utf-8", "surrogateescape")


def peer_name(raw: bytes) -> str:
    """A peer name for any identity bytes; `identity` turns it back, byte for byte."""
    return raw.decode("utf-8", "surrogateescape")


def limit_receive(socket: zmq.Socket, max_frame_bytes: int) -> None:
    """Let `socket` drop a connection that sends a message part over the limit (plus what CURVE
    adds to it on the wire), unread; a part within that margin reaches the codec's check."""
    socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + curve.WIRE_OVERHEAD)


def bind(socket: zmq.Socket, host: str, ports: tuple[int, int] | None) -> int:
    """Bind `socket` to the first free port of `ports` on `host` (any port if None)."""
    if ports is None:
        return socket.bind_to_random_port(f"tcp://{host}")
    for port in range(ports[0], ports[1] + 1):
        try:
            socket.bind(f"tcp://{host}:{port}")
            return port
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
    raise zmq.ZMQError(zmq.EADDRINUSE, f"no free port in {ports[0]}-{ports[1]} on {host}")


class ControlChannel:
    def __init__(
        self,
        context: zmq.Context,
        codec: Codec,
        host: str,
        watch: Watch | None = None,
        monitor_peers: bool = False,
        ports: tuple[int, int] | None = None,
    ) -> None:
        """`ports`: (low, high) the inbound socket binds in; None: any free port. A context made
        by `curve.context(keys)` makes the inbound socket a CURVE server, the outbound clients."""
        self.codec = codec
        self._context = context
        self._watch: Watch = watch or (lambda socket, on: None)
        self._monitor_peers = monitor_peers  # report peers whose connection dropped
        self.max_peers = MAX_PEERS
        self.inbound = context.socket(zmq.ROUTER)
        self.inbound.setsockopt(zmq.LINGER, 0)
        limit_receive(self.inbound, codec.max_frame_bytes)  # the identity part is added locally
        curve.serve(self.inbound)
        port = bind(self.inbound, host, ports)
        self.address = f"tcp://{host}:{port}"
        self._outbound: dict[str, zmq.Socket] = {}
        self._peer_of: dict[zmq.Socket, str] = {}  # outbound socket -> its peer
        self._monitors: dict[zmq.Socket, str] = {}  # monitor socket -> the peer it watches
        self._monitor_of: dict[str, zmq.Socket] = {}
        self._last_used: dict[str, float] = {}  # peer -> when a frame last went to it
        self._dropped: list[str] = []  # peers whose connection dropped, not yet taken
        # sockets sent on, or left unread, since `waiting` last looked (see there)
        self._touched: set[zmq.Socket] = set()
        self.peers_refused = 0
        self._watch(self.inbound, True)

    # --- outbound ------------------------------------------------------------------------------

    def open(self, peer: str) -> None:
        """Open the outbound socket to a checked peer (no-op if open). Raises PeerLimitError at
        the cap, ValueError for an address ZeroMQ cannot connect to."""
        if peer in self._outbound:
            return
        if len(self._outbound) >= self.max_peers:
            self.peers_refused += 1
            raise PeerLimitError(f"busy: this rank already talks to {self.max_peers} peers")
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.address.encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 10_000)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        limit_receive(socket, self.codec.max_frame_bytes)
        try:
            socket.connect(peer)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise ValueError(f"cannot connect to control address {peer!r}: {exc}") from None
        self._outbound[peer], self._peer_of[socket] = socket, peer
        self._last_used[peer] = time.monotonic()
        self._watch(socket, True)
        if self._monitor_peers:
            self._monitor(peer, socket)

    def send(self, peer: str, message: Message) -> bool:
        """Queue `message` to `peer`, opening its socket if needed; False if the peer's queue is
        full (it is not draining) or no socket can be opened to it."""
        try:
            self.open(peer)
            socket = self._outbound[peer]
            self._touched.add(socket)
            socket.send(self.codec.encode(message), zmq.NOBLOCK)
        except (zmq.Again, PeerLimitError, ValueError):
            return False
        self._last_used[peer] = time.monotonic()
        return True

    def reply(self, peer: str, message: Message) -> None:
        """Answer a frame from `peer` back over the connection it came in on; dropped if that
        connection is gone or not draining (the sender has not proved it is worth more)."""
        self._touched.add(self.inbound)
        with contextlib.suppress(zmq.ZMQError):
            self.inbound.send_multipart([identity(peer), self.codec.encode(message)], zmq.NOBLOCK)

    def is_open(self, peer: str) -> bool:
        return peer in self._outbound

    @property
    def open_peers(self) -> int:
        return len(self._outbound)

    def idle(self, now: float, idle_s: float) -> list[str]:
        """Peers with an open socket that nothing was sent to for more than `idle_s`."""
        return [p for p, t in self._last_used.items() if now - t > idle_s]

    def forget(self, peer: str) -> None:
        """Drop the outbound socket to a peer that is gone (queued frames are discarded)."""
        socket = self._outbound.pop(peer, None)
        self._last_used.pop(peer, None)
        if socket is None:
            return
        del self._peer_of[socket]
        self._touched.discard(socket)
        monitor = self._monitor_of.pop(peer, None)
        if monitor is not None:
            socket.disable_monitor()
            self._watch(monitor, False)
            del self._monitors[monitor]
            monitor.close(linger=0)
        self._watch(socket, False)
        socket.close(linger=0)

    def close(self) -> None:
        for peer in list(self._outbound):
            self.forget(peer)
        self._watch(self.inbound, False)
        self.inbound.close(linger=0)

    def _monitor(self, peer: str, socket: zmq.Socket) -> None:
        monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitors[monitor], self._monitor_of[peer] = peer, monitor
        self._watch(monitor, True)

    # --- inbound -------------------------------------------------------------------------------

    def receive(self, ready) -> list[tuple[str, Message | WireError]]:
        """The frames waiting on the sockets in `ready` (those the poller found readable),
        decoded, with the sender's name; never blocks, reads at most MAX_FRAMES_PER_TURN."""
        received: list[tuple[str, Message | WireError]] = []
        for socket in ready:
            if socket is self.inbound:
                self._read(socket, None, received)
            elif socket in self._peer_of:
                self._read(socket, self._peer_of[socket], received)
            elif socket in self._monitors:
                self._read_events(socket)
        return received

    def waiting(self) -> list[zmq.Socket]:
        """The sockets that may hold frames their descriptors no longer tell of: a socket's
        descriptor says only what changed since the socket was last used, and a send (or a read
        that stopped before the socket was empty) may take a frame's notice in. Those sent on
        or left unread since the last call, asked whether a frame waits."""
        touched, self._touched = self._touched, set()
        return [s for s in touched if s.getsockopt(zmq.EVENTS) & zmq.POLLIN]

    def take_dropped(self) -> list[str]:
        """Peers whose TCP connection dropped since the last call (monitor_peers only)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def _read(self, socket: zmq.Socket, peer: str | None, received: list) -> None:
        while True:
            if len(received) >= MAX_FRAMES_PER_TURN:
                self._touched.add(socket)  # the rest in a later turn
                return
            message = _recv_message(socket, 2 if peer is None else 1)
            if message is None:
                return
            parts, count, size = message
            if peer is None:  # ROUTER: the first part is the sender's identity
                sender, size = peer_name(parts[0].bytes), size - len(parts[0])
                parts, count = parts[1:], count - 1
            else:
                sender = peer
            if count != 1:
                received.append((sender, multipart_error(count, size, self.codec.max_frame_bytes)))
                continue
            try:
                received.append((sender, self.codec.decode(parts[0].bytes)))
            except WireError as exc:
                received.append((sender, exc))

    def _read_events(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = self._monitors.get(monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and peer is not None:
                self._dropped.append(peer)


def _recv_message(socket: zmq.Socket, keep: int) -> tuple[list[zmq.Frame], int, int] | None:
    """One whole message: its first `keep` parts, how many parts it had and their bytes in
    all; None if none is waiting. Parts past `keep` are released as they are read, never
    joined."""
    try:
        first = socket.recv(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    parts, count, size, more = [first], 1, len(first), first.more
    while more:
        part = socket.recv(copy=False)  # ZeroMQ delivers a message's parts together: no wait
        count, size, more = count + 1, size + len(part), part.more
        if len(parts) < keep:
            parts.append(part)
    return parts, count, size


def request(
    context: zmq.Context, codec: Codec, address: str, message: Message, timeout_s: float
) -> Message:
    """One request/reply exchange with a ROUTER server, on a connection of its own; raises
    TimeoutError, WireError."""
    socket = dealer(context, codec, address)
    try:
        return exchange(socket, codec, address, message, timeout_s)
    finally:
        socket.close(linger=0)


def dealer(context: zmq.Context, codec: Codec, address: str) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    limit_receive(socket, codec.max_frame_bytes)
    try:
        socket.connect(address)
    except zmq.ZMQError:
        socket.close(linger=0)
        raise
    return socket


def exchange(
    socket: zmq.Socket, codec: Codec, address: str, message: Message, timeout_s: float
) -> Message:
    socket.send(codec.encode(message))
    if not socket.poll(int(timeout_s * 1000)):
        raise TimeoutError(f"no reply from {address} within {timeout_s:g}s")
    reply = _recv_message(socket, 1)
    if reply is None or reply[1] != 1:
        raise WireError(f"reply from {address} is not one frame")
    return codec.decode(reply[0][0].bytes)
