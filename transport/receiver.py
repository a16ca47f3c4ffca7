"""Decode side: registers each room with the prefill ranks; its receive pipeline
(recv_pipeline.py) takes each arriving region into the staging ring, scatters it into the
paged KV cache, and frees the region once the scatter has run. A room succeeds when every
writer's chunks are in with their scatters queued, and every prefill rank has said it is done
(with the first sampled token): the engine orders its stream after the last scatter
(`KVReceiver.order_kv`) rather than waiting for a wake-up that says the scatter ran."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from kvferry.staging.kv_copy import KVPlanes, host_slots
from kvferry.staging.layout import KVLayout, layer_groups
from kvferry.staging.plan import cached_plan
from kvferry.transport.agent import TransferAgent
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import PeerLimitError
from kvferry.transport.core import AgentCore
from kvferry.transport.curve import CurveKeys
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.directory import PrefillDirectory, check_addresses, check_ranks
from kvferry.transport.failure import Failure, FailureKind, timeout
from kvferry.transport.handles import KVReceiver
from kvferry.transport.messages import (
    Abort,
    ErrorReply,
    Heartbeat,
    Message,
    RankInfo,
    RegisterRoom,
    TransferDone,
)
from kvferry.transport.recv_pipeline import RecvPipeline
from kvferry.transport.recv_room import RecvRoom
from kvferry.transport.room import KVPoll, RoomVisits
from kvferry.transport.tags import MAX_KEY
from kvferry.transport.timeline import first, last, merge_prefill

log = logging.getLogger(__name__)


class DecodeAgent(TransferAgent):
    """One decode rank's transfer agent."""

    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        planes: KVPlanes,
        data: DataPlane,
        keys: CurveKeys | None = None,
    ) -> None:
        self.core = AgentCore(
            f"kvferry-decode-{layout.tp_rank}",
            config,
            layout,
            planes,
            data,
            self._on_message,
            self._step,
            self._on_peer_lost,
            self._abort,
            on_dropped=self._on_dropped,
            keys=keys,
        )
        self.config, self.layout, self.planes = config, layout, planes
        self._groups = layer_groups(layout.num_layers, config.layer_group, config.layer_taper)
        # each prefill rank accepts a registration by naming it in its next heartbeat: one
        # interval more than bootstrap_timeout_s for it to come
        self._accept_timeout_s = config.bootstrap_timeout_s + config.heartbeat_interval_s
        self.rooms: dict[int, RecvRoom] = {}
        self._by_key: dict[int, RecvRoom] = {}
        # unguessable receive keys (data tags carry them), never one that is live
        self._keys = (
            k for k in iter(lambda: secrets.randbelow(MAX_KEY) + 1, 0) if k not in self._by_key
        )
        self.directory = PrefillDirectory(self.core.zmq_context, config, self.core.loop.post)
        self._visits = RoomVisits()  # rooms the next step checks (received, done, failing)
        self.arrivals = RecvPipeline(
            self.core, config, planes, self._by_key.get, self._fail, self._visits.touch,
            self._on_done,
        )  # fmt: skip
        self.core.loop.start()

    def receiver(
        self,
        room: int,
        slots,
        bootstrap: str,
        on_success: Callable[[KVReceiver], None] | None = None,
    ) -> KVReceiver:
        """The engine's handle for room `room`: its prompt's KV goes to cache `slots` (one per
        prompt token, on the host), from the prefill group behind `bootstrap`. `on_success`:
        called with the handle on this rank's transfer thread as the room succeeds, before
        `poll` says so (its first token known): what it raises is logged, never the room's."""
        handle = KVReceiver(self, room, host_slots(slots).copy(), bootstrap)
        handle.on_success = on_success
        self.planes.check_slice(handle.slots, 0, self.planes.num_heads)
        self.core.loop.post(lambda: self._open(handle))
        return handle

    def close(self) -> None:
        self.directory.close()
        self.core.close()

    def abort_on_loop(self, handle: KVReceiver, failure: Failure) -> None:
        """KVReceiver.abort on the loop thread: fail `handle`'s room with `failure` and tell
        its prefill ranks — unless the room open under its id is another handle's (this one
        was rejected as a duplicate) or is gone."""
        room = self.rooms.get(handle.room)
        if room is not None and room.handle is handle:
            self._fail(room, failure)

    # --- bootstrapping -----------------------------------------------------------------------

    def _open(self, handle: KVReceiver) -> None:
        if handle.room in self.rooms:
            duplicate = f"duplicate: room {handle.room:#x} is already open on this rank"
            handle.reject(Failure(FailureKind.INTERNAL, duplicate))
            self.core.bell.ring()
            return
        room = RecvRoom(
            handle,
            next(self._keys),
            self.config.chunk_tokens,
            self._groups,
            time.monotonic(),
            self.core.bell.ring,
        )
        self.rooms[room.room], self._by_key[room.key] = room, room
        self.directory.resolve(handle.bootstrap, room, self._resolved)

    def _resolved(
        self, rooms: list[RecvRoom], ranks: list[RankInfo] | None, error: Failure | None
    ) -> None:
        error = error or check_addresses(ranks)  # before anything connects to them
        for room in rooms:
            if error:
                self._fail(room, error, notify=False)
            elif room.open:
                self._register(room, ranks)
            else:  # failed while the lookup ran: the prefill ranks still need to hear of it
                for info in ranks:
                    self.core.control.send(
                        info.control_address, Abort(room.room, str(room.failing))
                    )

    def _register(self, room: RecvRoom, peers: list[RankInfo]) -> None:
        room.rank_peers = {info.layout.tp_rank: info.control_address for info in peers}
        for info in peers:
            self.core.peers.add_room(info.control_address, room.room)
        error = check_ranks(self.layout, peers) or self._open_peers(peers)
        if error:
            self._fail(room, error)
            return
        plan = cached_plan(
            self.layout.num_kv_heads, len(peers), self.layout.tp_size, self.layout.mla
        )
        room.writers = {s.src_rank: s for s in plan if s.dst_rank == self.layout.tp_rank}
        widest = max(s.num_heads for s in room.writers.values())
        largest = self.planes.layers(room.groups[0], self.layout.num_layers)
        need = largest.staging_bytes(min(room.chunk_tokens, room.num_tokens), widest)
        too_small = self.core.mode.ring_too_small(need, self.config)
        if too_small:
            self._fail(room, too_small)
            return
        room.max_message_bytes = self.core.mode.max_message_bytes(self.config)
        message = RegisterRoom(
            room.room,
            self.layout,
            self.core.data.address,
            self.core.control.address,
            room.key,
            room.num_tokens,
            room.chunk_tokens,
            self.config.mode,
            self.config.layer_group,
            room.max_message_bytes,
            self.config.layer_taper,
        )
        for info in peers:
            self.core.control.send(info.control_address, message)
        first(room.marks, "registered")  # accepted once each rank's heartbeat says so
        room.status.advance(KVPoll.WaitingForInput)
        try:  # after the frames, not before: no message can come before this turn progresses
            self.arrivals.prepare(room)
            self.arrivals.post_ahead(room, time.monotonic())
        except Exception as exc:  # one room's failure is its own, never the thread's
            self._fail(room, self.core.contain(exc, f"room {room.room:#x}"))

    def _open_peers(self, peers: list[RankInfo]) -> Failure | None:
        """Open the control sockets to a group's ranks; why not, or None."""
        try:
            for info in peers:
                self.core.control.open(info.control_address)
        except (PeerLimitError, ValueError) as exc:
            return Failure(FailureKind.REFUSED, str(exc))
        return None

    # --- control messages --------------------------------------------------------------------

    def _on_message(self, peer: str, message: Message) -> None:
        room = self.rooms.get(getattr(message, "room", None))
        if isinstance(message, Heartbeat):  # with the rooms a prefill rank has accepted
            for room_id in message.accepted:
                room = self.rooms.get(room_id)
                if room is not None and peer in room.rank_peers.values():
                    room.accepted.add(peer)
        elif isinstance(message, (Abort, ErrorReply)) and room is not None:
            aborted = Failure(FailureKind.PEER_ABORTED, f"aborted by prefill: {message.reason}")
            self._fail(room, aborted, skip_peer=peer)
        elif isinstance(message, ErrorReply):
            self.core.log.warning("peer error", "peer %r reports: %s", peer, message.reason)
        elif not isinstance(message, Abort):  # TransferDone comes on the data plane only
            self.core.refuse(peer, f"unexpected {type(message).__name__} at a decode rank")

    def _on_done(self, room: RecvRoom, message: TransferDone) -> None:
        if message.src_rank not in room.rank_peers or message.num_chunks != room.num_chunks:
            done = f"protocol: TransferDone from rank {message.src_rank} "
            self._fail(
                room,
                Failure(FailureKind.BAD_MESSAGE, done + f"for {message.num_chunks} chunks"),
            )
            return
        room.first_tokens[message.src_rank] = message.first_token
        room.accepted.add(room.rank_peers[message.src_rank])  # whatever its heartbeat said
        merge_prefill(room.marks, message.marks)
        if len(set(room.first_tokens.values())) > 1:
            tokens = f"mismatch: prefill ranks sampled different first tokens {room.first_tokens}"
            self._fail(room, Failure(FailureKind.BAD_MESSAGE, tokens))

    def _abort(self, room_id: int, failure: Failure) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            self._fail(room, failure)

    def _on_dropped(self, peer: str) -> None:
        """The connection to a prefill rank dropped (its daemon stopped or restarted: a new
        one has new addresses): the next room looks its group up afresh. Rooms it holds are
        judged by heartbeats, as a dropped connection may come back."""
        self.directory.forget(peer)

    def _on_peer_lost(self, peer: str, failure: Failure) -> None:
        self.directory.forget(peer)
        for room in [r for r in self.rooms.values() if peer in r.rank_peers.values()]:
            self._fail(room, failure, skip_peer=peer)

    # --- progress ----------------------------------------------------------------------------

    def _step(self, now: float) -> bool:
        self.arrivals.step(now)
        for room_id in self._visits.take(self.rooms, now):
            room = self.rooms.get(room_id)
            if room is None:
                continue
            try:
                self._check_room(room, now)
            except Exception as exc:  # one room's failure is its own, never the thread's
                self._fail(room, self.core.contain(exc, f"room {room.room:#x}"))
        return self.arrivals.busy

    def _check_room(self, room: RecvRoom, now: float) -> None:
        if room.failing is not None:
            if room.busy == 0:  # nothing will write into its pages any more: tell the engine
                room.status.fail(room.failing)
                self._close(room)
            return
        age = now - room.created
        if not room.all_accepted and age > self._accept_timeout_s:
            self._fail(
                room,
                timeout(f"timeout: room not registered with every prefill rank after {age:.1f}s"),
            )
        elif age > self.config.transfer_timeout_s:
            self._fail(room, timeout(f"timeout: transfer unfinished after {age:.1f}s"))
        elif room.writers and room.complete(self.core.mode, self.planes.num_planes):
            last(room.marks, "kv_ready")
            room.handle.first_token = next(iter(room.first_tokens.values()))
            room.handle.marks = dict(room.marks)
            room.handle.kv_fence = room.kv_fence
            if room.handle.on_success is not None:
                try:
                    room.handle.on_success(room.handle)
                except Exception as exc:  # the engine's to see; the room has its KV all the same
                    self.core.contain(exc, f"room {room.room:#x}'s success callback")
            room.status.advance(KVPoll.Success)
            self.core.stats.rooms_succeeded += 1
            self._close(room)

    def _fail(
        self, room: RecvRoom, failure: Failure, notify: bool = True, skip_peer: str | None = None
    ) -> None:
        if not room.open:
            return
        room.failing = failure
        self.arrivals.cancel_ahead(room)
        self.core.stats.failed(failure)
        log.info("room %#x failed: %s", room.room, failure)
        if notify:
            for peer in room.rank_peers.values():
                if peer != skip_peer:
                    self.core.control.send(peer, Abort(room.room, str(failure)))
        self._check_room(room, time.monotonic())

    def _close(self, room: RecvRoom) -> None:
        for peer in room.rank_peers.values():
            self.core.peers.remove_room(peer, room.room)
        self.rooms.pop(room.room, None)
        self._by_key.pop(room.key, None)
