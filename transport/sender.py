"""Prefill side: gathers each chunk's head slices into the staging ring and sends each
(chunk, destination) region as one tagged message — or one per layer group, each gathered as
soon as the forward has written its layers — or, in slice mode, one message per token and plane
straight from the cache."""

from __future__ import annotations

import logging
import time

import numpy as np

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import cached_plan
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import PeerLimitError, request
from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import DataPlane, InvalidAddress
from kvferry.transport.handles import KVSender
from kvferry.transport.messages import (
    Abort,
    Ack,
    Codec,
    ErrorReply,
    Message,
    RankInfo,
    RegisterRank,
    RegisterRoom,
    RoomAccepted,
    TransferDone,
)
from kvferry.transport.room import KVPoll
from kvferry.transport.send_pipeline import SendPipeline
from kvferry.transport.send_room import Dest, Outgoing, Ready, SendRoom, check_registration
from kvferry.transport.tombstones import Tombstones

log = logging.getLogger(__name__)
MAX_ROOMS = 4096  # open rooms per rank; registrations of new rooms past it are refused


class PrefillAgent:
    """One prefill rank's transfer agent; registers with the bootstrap server on start, with
    the token its daemon handed it."""

    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        planes: KVPlanes,
        data: DataPlane,
        bootstrap: str,
        token: bytes,
    ) -> None:
        self.core = AgentCore(
            f"kvferry-prefill-{layout.tp_rank}",
            config,
            layout,
            planes,
            data,
            self._on_message,
            self._step,
            self._on_peer_lost,
            self._abort,
        )
        self.config, self.layout, self.planes = config, layout, planes
        self.rooms: dict[int, SendRoom] = {}
        self.tombstones = Tombstones()
        self.pipeline = SendPipeline(self.core, config, self._fail)
        self._register(bootstrap, token)
        self.core.loop.start()

    def sender(self, room: int, num_tokens: int) -> KVSender:
        """The engine's handle for room `room`, whose prompt has `num_tokens` tokens."""
        handle = KVSender(self, room, num_tokens)
        self.core.loop.post(lambda: self._claim(handle))
        return handle

    def close(self) -> None:
        self.core.close()

    @property
    def ring(self):
        return self.core.staging.ring if self.core.staging is not None else None

    def _register(self, bootstrap: str, token: bytes) -> None:
        """Join the group at `bootstrap`; `token` proves this rank was started by its daemon."""
        info = RankInfo(self.layout, self.core.data.address, self.core.control.address)
        codec = Codec(self.config.max_frame_bytes)
        reply = request(
            self.core.zmq_context,
            codec,
            bootstrap,
            RegisterRank(info, token),
            self.config.bootstrap_timeout_s,
        )
        if not isinstance(reply, Ack):
            raise RuntimeError(
                f"bootstrap server {bootstrap} refused rank {self.layout.tp_rank}: {reply}"
            )

    # --- engine-facing operations, run on the loop thread -----------------------------------

    def _claim(self, handle: KVSender) -> None:
        tomb = self.tombstones.pop(handle.room)
        room = self.rooms.get(handle.room)
        if room is None:
            room = self.rooms[handle.room] = SendRoom(handle.room, time.monotonic(), self.config)
        room.attach(handle)
        if tomb is not None:
            self._fail(room, tomb, notify=False)
        elif room.num_tokens is not None and room.num_tokens != handle.num_tokens:
            self._fail(
                room,
                f"mismatch: num_tokens {handle.num_tokens} at prefill "
                f"vs {room.num_tokens} at decode",
            )

    def _add_tokens(self, room_id: int, slots: np.ndarray, ready: Ready, first_token, last) -> None:
        room = self.rooms.get(room_id)
        if room is None or room.status.finished:
            return
        error = room.add_tokens(slots, ready, first_token, last)
        if error:
            self._fail(room, error)

    def _abort(self, room_id: int, reason: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            self._fail(room, reason)

    # --- control messages --------------------------------------------------------------------

    def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, RegisterRoom):
            self._on_register(peer, message)
        elif isinstance(message, Abort):
            self._on_abort(peer, message)
        elif isinstance(message, ErrorReply):
            self.core.log.warning("peer error", "peer %r reports: %s", peer, message.reason)
            if message.room is not None:
                self._on_abort(peer, Abort(message.room, message.reason))
        else:
            self.core.refuse(peer, f"unexpected {type(message).__name__} at a prefill rank")

    def _on_register(self, peer: str, msg: RegisterRoom) -> None:
        """A decode rank registers a room. The sender becomes a peer (an outbound socket, a
        data-plane endpoint, heartbeats) only once every check has passed; until then it is
        answered over the connection its frame came in on."""
        room = self._room_to_register(peer, msg.room)
        if room is None:
            return
        error = self._check_sender(peer, msg) or room.register(msg, self.layout.num_layers)
        endpoint, error = (None, error) if error else self._connect(peer, msg)
        if error:
            self.core.refuse(peer, error, msg.room)
            self._fail(room, error, notify=True)
            return
        plan = cached_plan(
            self.layout.num_kv_heads, self.layout.tp_size, msg.layout.tp_size, self.layout.mla
        )
        mine = [
            s
            for s in plan
            if s.src_rank == self.layout.tp_rank and s.dst_rank == msg.layout.tp_rank
        ]
        room.dests[msg.layout.tp_rank] = Dest(
            peer, msg.ucx_address, endpoint, msg.recv_key, mine[0] if mine else None
        )
        self.core.peers.add_room(peer, msg.room)
        self.core.control.send(peer, RoomAccepted(msg.room, self.layout.tp_rank))

    def _room_to_register(self, peer: str, room_id: int) -> SendRoom | None:
        """The open room a registration is for (made if new); None, answered, if there is
        none to register with."""
        room = self.rooms.get(room_id)
        if room is None and room_id in self.tombstones:
            self.core.refuse(peer, self.tombstones.reason(room_id), room_id)
            return None
        if room is None and len(self.rooms) >= MAX_ROOMS:
            self.core.refuse(peer, f"busy: {MAX_ROOMS} rooms already open on this rank", room_id)
            return None
        if room is None:
            room = self.rooms[room_id] = SendRoom(room_id, time.monotonic(), self.config)
        elif room.status.finished:
            self.core.refuse(peer, room.status.reason or "room already finished", room_id)
            return None
        return room

    def _check_sender(self, peer: str, msg: RegisterRoom) -> str | None:
        if msg.control_address != peer:
            return (
                f"invalid: control_address {msg.control_address!r} is not the address the "
                f"frame came from ({peer!r})"
            )
        return check_registration(msg, self.layout, self.planes, self.config)

    def _connect(self, peer: str, msg: RegisterRoom) -> tuple[object, str | None]:
        """Open the control socket and data-plane endpoint to a checked decode rank:
        (endpoint, None), or (None, why not) with nothing opened for it left behind."""
        try:
            self.core.control.open(peer)
        except (PeerLimitError, ValueError) as exc:
            return None, str(exc)
        try:
            return self.core.endpoint(msg.ucx_address, self._on_endpoint_error), None
        except InvalidAddress as exc:
            if not self.core.peers.rooms_of(peer):
                self.core.control.forget(peer)
            return None, f"invalid: ucx_address: {exc}"

    def _on_abort(self, peer: str, msg: Abort) -> None:
        room = self.rooms.get(msg.room)
        reason = f"aborted by decode: {msg.reason}"
        if room is None:  # the engine may claim it yet: it must find the room failed
            self.tombstones.bury(msg.room, reason, time.monotonic())
        else:
            self._fail(room, reason, skip_peer=peer)

    def _on_peer_lost(self, peer: str, reason: str) -> None:
        for room in [
            r for r in self.rooms.values() if any(d.peer == peer for d in r.dests.values())
        ]:
            self._fail(room, reason, skip_peer=peer)

    def _on_endpoint_error(self, ucx_address: bytes, why: str) -> None:
        self.core.data.drop_endpoint(ucx_address)
        for room in [
            r
            for r in self.rooms.values()
            if any(d.ucx_address == ucx_address for d in r.dests.values())
        ]:
            self._fail(room, f"peer lost: {why}")

    # --- progress ----------------------------------------------------------------------------

    def _step(self, now: float) -> bool:
        self.pipeline.step(now)
        for room in list(self.rooms.values()):  # after the pipeline: rooms it just completed
            try:
                self._advance(room, now)
            except Exception as exc:  # one room's failure is its own, never the thread's
                self._fail(room, self.core.contain(exc, f"room {room.room:#x}"))
        self._purge(now)
        return self.pipeline.busy

    def _advance(self, room: SendRoom, now: float) -> None:
        if room.status.finished:
            return
        expired = room.expired(now)
        if expired:
            self._fail(room, expired)
            return
        if room.handle is None or not room.registered:
            return
        room.status.advance(KVPoll.WaitingForInput)
        num_layers, groups = self.layout.num_layers, room.groups
        for chunk, slots, ready in room.ready_chunks():
            for g, layers in enumerate(groups):  # all of group g, then g + 1: the forward's order
                planes = self.planes.layers(layers, num_layers)
                fence = ready.for_layers(layers.stop)
                for dest in room.dests.values():
                    if dest.slice is not None:
                        piece = chunk * len(groups) + g
                        self.pipeline.add(
                            Outgoing(
                                room, piece, self.layout.tp_rank, dest, slots, planes, fence, now
                            )
                        )
        if room.complete:
            for dest in room.dests.values():
                self.core.control.send(
                    dest.peer,
                    TransferDone(
                        room.room, self.layout.tp_rank, room.num_chunks, _token(room.first_token)
                    ),
                )
            room.status.advance(KVPoll.Success)
            self.core.stats.rooms_succeeded += 1
            self._release_peers(room)

    def _fail(
        self, room: SendRoom, reason: str, notify: bool = True, skip_peer: str | None = None
    ) -> None:
        if not room.status.fail(reason):
            return
        self.core.stats.failed(reason)
        log.info("room %#x failed: %s", room.room, reason)
        if notify:
            for dest in room.dests.values():
                if dest.peer != skip_peer:
                    self.core.control.send(dest.peer, Abort(room.room, reason))
        self._release_peers(room)

    def _release_peers(self, room: SendRoom) -> None:
        for dest in room.dests.values():
            self.core.peers.remove_room(dest.peer, room.room)

    def _purge(self, now: float) -> None:
        """Finished rooms become tombstones: late registrations or aborts must not open them
        again, and an engine claiming one late finds it failed."""
        for room_id in [
            r for r, room in self.rooms.items() if room.status.finished and room.in_flight == 0
        ]:
            room = self.rooms.pop(room_id)
            self.tombstones.bury(room_id, room.status.reason or "room already finished", now)
        self.tombstones.expire(now)


def _token(token) -> int | None:
    """The first token as an int; the engine may hand over a host tensor that an asynchronous
    copy fills before the last chunk's `ready` event fires (long before this runs)."""
    return None if token is None else int(token)
