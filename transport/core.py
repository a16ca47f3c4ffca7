"""What every transfer agent is made of, prefill or decode: its staging ring and copy stream,
control channel, data plane, peer liveness and the loop thread. The role-specific agents
(sender.py, receiver.py) compose one and supply the message handler and the step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.copy_stream import CopyStream
from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import ControlChannel
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.loop import AgentLoop
from kvferry.transport.messages import Codec, ErrorReply, Heartbeat, Message, WireError
from kvferry.transport.peers import PeerTracker

log = logging.getLogger(__name__)


@dataclass
class TransferStats:
    """Counters of one agent (exported as metrics by the daemons)."""

    ring_waits: int = 0  # chunks that found the staging ring full
    ring_wait_s: float = 0.0
    bad_frames: int = 0
    unexpected_messages: int = 0  # data messages for unknown or finished rooms (discarded)
    rooms_succeeded: int = 0
    copy_s: float = 0.0  # summed time from queuing a gather/scatter to its completion
    wire_s: float = 0.0  # summed time from posting a send/receive to its completion
    failures: dict[str, int] = field(default_factory=dict)  # by reason category

    def failed(self, reason: str) -> None:
        category = reason.split(":", 1)[0]
        self.failures[category] = self.failures.get(category, 0) + 1


class AgentCore:
    def __init__(
        self,
        name: str,
        config: TransferConfig,
        layout: KVLayout,
        planes: KVPlanes,
        data: DataPlane,
        on_message: Callable[[str, Message], None],
        step: Callable[[float], bool],
        on_peer_lost: Callable[[str, str], None],
    ) -> None:
        _check_planes(layout, planes)
        self.config, self.layout, self.planes, self.data = config, layout, planes, data
        self.stats = TransferStats()
        self.staging = (
            StagingBuffer(config.staging_bytes, planes.device) if config.mode == "staged" else None
        )
        self.copies = CopyStream(planes.device)
        self._zmq = zmq.Context()
        self.control = ControlChannel(self._zmq, Codec(config.max_frame_bytes), config.host)
        self.peers = PeerTracker(config.heartbeat_interval_s, config.heartbeat_timeout_s)
        self._on_message, self._step, self._on_peer_lost = on_message, step, on_peer_lost
        self.loop = AgentLoop(name, self.control.inbound, self._read_frames, self._turn)

    @property
    def zmq_context(self) -> zmq.Context:
        return self._zmq

    def close(self) -> None:
        self.loop.stop()
        self.control.close()
        self.data.close()
        self._zmq.term()
        if self.staging is not None:
            self.staging.close()

    def endpoint(self, ucx_address: bytes, on_error: Callable[[bytes, str], None]):
        """Data-plane endpoint to a peer; its failure is handed to the loop thread."""
        return self.data.endpoint(
            ucx_address, lambda why: self.loop.post(lambda: on_error(ucx_address, why))
        )

    def _read_frames(self) -> None:
        for peer, message in self.control.receive():
            if isinstance(message, WireError):
                self.stats.bad_frames += 1
                log.warning("bad control frame from %s: %s", peer, message)
                self._reply_error(peer, str(message))
                continue
            self.peers.heard(peer)
            if not isinstance(message, Heartbeat):
                self._on_message(peer, message)

    def _reply_error(self, peer: str, reason: str) -> None:
        if peer.startswith("tcp://"):  # a well-formed identity: the sender can be answered
            with contextlib.suppress(zmq.ZMQError):  # an identity that is no address: no answer
                self.control.send(peer, ErrorReply(reason))

    def _turn(self, now: float) -> bool:
        for peer in self.peers.due_heartbeats(now):
            self.control.send(peer, Heartbeat())
        for peer in self.peers.silent(now):
            self._on_peer_lost(
                peer, f"peer lost: {peer} silent for over {self.config.heartbeat_timeout_s:g}s"
            )
            self.peers.forget(peer)
        return self._step(now)


def _check_planes(layout: KVLayout, planes: KVPlanes) -> None:
    expected = (layout.num_planes, layout.local_heads, layout.head_dim, layout.itemsize)
    actual = (planes.num_planes, planes.num_heads, planes.head_dim, planes.itemsize)
    if expected != actual:
        raise ValueError(
            f"KV cache (planes, heads, head_dim, itemsize)={actual} does not match the "
            f"layout's {expected}"
        )
