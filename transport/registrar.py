"""How a prefill rank admits a decode rank's RegisterRoom: the room it is for (new, finished,
remembered as failed, or one too many), whether its sender is who it claims to be and its
registration fits this rank, and what is opened for it.

The sender becomes a peer (an outbound socket, a data-plane endpoint held for the room,
heartbeats) only once every check has passed; until then it is answered over the connection its
frame came in on, and a refused registration leaves nothing opened for it behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import cached_plan
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import PeerLimitError
from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import EndpointLimitError, InvalidAddress
from kvferry.transport.endpoints import EndpointPool
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.messages import RegisterRoom
from kvferry.transport.send_room import Dest, SendRoom, check_registration
from kvferry.transport.tombstones import Tombstones

MAX_ROOMS = 4096  # open rooms per rank; registrations of new rooms past it are refused


class Registrar:
    def __init__(
        self,
        core: AgentCore,
        config: TransferConfig,
        layout: KVLayout,
        planes: KVPlanes,
        rooms: dict[int, SendRoom],
        tombstones: Tombstones,
        endpoints: EndpointPool,
        fail_room: Callable[[SendRoom, Failure], None],
    ) -> None:
        """`rooms` and `tombstones` are the agent's own: a new room is added to `rooms`."""
        self.core, self.config, self.layout, self.planes = core, config, layout, planes
        self.rooms, self.tombstones, self.endpoints = rooms, tombstones, endpoints
        self._fail_room = fail_room

    def register(self, peer: str, msg: RegisterRoom) -> None:
        """Admit `peer`'s registration of a room, or refuse it (and fail the room)."""
        if self._over_limit(peer, msg.room):
            return
        room = self._room_for(peer, msg.room)
        if room is None:
            return
        error = self._check_sender(peer, msg) or room.register(msg, self.layout.num_layers)
        endpoint, error = (None, error) if error else self._connect(peer, msg)
        if error:
            self.core.refuse(peer, str(error), msg.room)
            self._fail_room(room, error)
            return
        room.dests[msg.layout.tp_rank] = self._dest(peer, msg, endpoint)
        self.core.peers.add_room(peer, msg.room)
        self.core.accept(peer, msg.room)  # told in the next heartbeat, not a frame now

    def _room_for(self, peer: str, room_id: int) -> SendRoom | None:
        """The open room a registration is for (made if new); None, answered, if there is
        none to register with."""
        room = self.rooms.get(room_id)
        if room is None and room_id in self.tombstones:
            self.core.refuse(peer, str(self.tombstones.reason(room_id)), room_id)
            return None
        if room is None and len(self.rooms) >= MAX_ROOMS:
            self.core.refuse(peer, f"busy: {MAX_ROOMS} rooms already open on this rank", room_id)
            return None
        if room is None:
            room = self.rooms[room_id] = SendRoom(
                room_id, time.monotonic(), self.config, self.core.bell.ring
            )
        elif room.status.finished:
            self.core.refuse(peer, str(room.status.failure or "room already finished"), room_id)
            return None
        return room

    def _over_limit(self, peer: str, room_id: int) -> bool:
        """Whether one more room would take `peer` past its share of this rank; if so it is
        told, and nothing is opened or failed for it (the rank's own rooms are not its to
        fail)."""
        held = self.core.peers.rooms_of(peer)
        if room_id in held:
            return False
        limit, value = "max_rooms_per_peer", self.config.max_rooms_per_peer
        if len(held) < value:
            room = self.rooms.get(room_id)
            if room is not None and room.handle is not None:
                return False  # a prompt here claims it: not a pending registration
            limit, value = "max_pending_rooms_per_peer", self.config.max_pending_rooms_per_peer
            if sum(self.rooms[r].handle is None for r in held if r in self.rooms) < value:
                return False
        self.core.stats.refused_by(limit)
        self.core.refuse(peer, f"busy: {limit}={value} reached by this peer", room_id)
        return True

    def _check_sender(self, peer: str, msg: RegisterRoom) -> Failure | None:
        if msg.control_address != peer:
            invalid = (
                f"invalid: control_address {msg.control_address!r} is not the address the "
                f"frame came from ({peer!r})"
            )
            return Failure(FailureKind.BAD_MESSAGE, invalid)
        return check_registration(msg, self.layout, self.planes, self.config, self.core.mode)

    def _connect(self, peer: str, msg: RegisterRoom) -> tuple[object, Failure | None]:
        """Open the control socket to a checked decode rank and hold the data-plane endpoint
        to it for the room: (endpoint, None), or (None, why not) with nothing opened for it
        left behind."""
        try:
            self.core.control.open(peer)
        except (PeerLimitError, ValueError) as exc:
            return None, Failure(FailureKind.REFUSED, str(exc))
        try:
            return self.endpoints.hold(msg.ucx_address, msg.room), None
        except (InvalidAddress, EndpointLimitError) as exc:
            if not self.core.peers.rooms_of(peer):
                self.core.control.forget(peer)
            if isinstance(exc, InvalidAddress):
                return None, Failure(FailureKind.BAD_MESSAGE, f"invalid: ucx_address: {exc}")
            return None, Failure(FailureKind.REFUSED, str(exc))

    def _dest(self, peer: str, msg: RegisterRoom, endpoint) -> Dest:
        plan = cached_plan(
            self.layout.num_kv_heads, self.layout.tp_size, msg.layout.tp_size, self.layout.mla
        )
        mine = [
            s
            for s in plan
            if s.src_rank == self.layout.tp_rank and s.dst_rank == msg.layout.tp_rank
        ]
        return Dest(peer, msg.ucx_address, endpoint, msg.recv_key, mine[0] if mine else None)
