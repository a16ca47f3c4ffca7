"""ZeroMQ control channel of one rank: one inbound ROUTER, one outbound DEALER per peer.

Knows nothing of message types: it moves frames through a Codec. A DEALER's identity is its
owner's own inbound address, so the receiving ROUTER learns who sent each frame. Owned by the
agent thread that created its sockets' traffic (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import zmq

from kvferry.transport.messages import Codec, Message, WireError

HARD_FRAME_LIMIT_FACTOR = 16  # frames above limit x this are dropped by ZeroMQ itself (memory)


class ControlChannel:
    def __init__(self, context: zmq.Context, codec: Codec, host: str) -> None:
        self.codec = codec
        self._context = context
        self.inbound = context.socket(zmq.ROUTER)
        self.inbound.setsockopt(zmq.LINGER, 0)
        self.inbound.setsockopt(zmq.MAXMSGSIZE, codec.max_frame_bytes * HARD_FRAME_LIMIT_FACTOR)
        port = self.inbound.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._outbound: dict[str, zmq.Socket] = {}
        self.bad_frames = 0

    def send(self, peer: str, message: Message) -> bool:
        """Queue `message` to `peer`; False if the peer's queue is full (it is not draining)."""
        try:
            self._dealer(peer).send(self.codec.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def receive(self) -> list[tuple[str, Message | WireError]]:
        """Every frame waiting now, decoded, with the sender's address; never blocks."""
        received = []
        while True:
            try:
                parts = self.inbound.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return received
            peer = parts[0].decode(errors="replace")
            if len(parts) != 2:
                self.bad_frames += 1
                received.append((peer, WireError(f"expected 1 frame, got {len(parts) - 1}")))
                continue
            try:
                received.append((peer, self.codec.decode(parts[1])))
            except WireError as exc:
                self.bad_frames += 1
                received.append((peer, exc))

    def forget(self, peer: str) -> None:
        """Drop the outbound socket to a peer that is gone (queued frames are discarded)."""
        socket = self._outbound.pop(peer, None)
        if socket is not None:
            socket.close(linger=0)

    def close(self) -> None:
        for peer in list(self._outbound):
            self.forget(peer)
        self.inbound.close(linger=0)

    def _dealer(self, peer: str) -> zmq.Socket:
        socket = self._outbound.get(peer)
        if socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.IDENTITY, self.address.encode())
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 10_000)
            socket.connect(peer)
            self._outbound[peer] = socket
        return socket


def request(
    context: zmq.Context, codec: Codec, address: str, message: Message, timeout_s: float
) -> Message:
    """One request/reply exchange with a ROUTER server; raises TimeoutError, WireError."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send(codec.encode(message))
        if not socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply from {address} within {timeout_s:g}s")
        return codec.decode(socket.recv())
    finally:
        socket.close(linger=0)
