"""Prefill side: gathers each chunk's head slices into the staging ring and sends each
(chunk, destination) region as one tagged message — or one per layer group, each gathered as
soon as the forward has written its layers — or, in slice mode, one message per token and plane
straight from the cache. Decode ranks' registrations are admitted by registrar.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.transport.agent import TransferAgent
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import request
from kvferry.transport.core import AgentCore
from kvferry.transport.curve import CurveKeys
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.endpoints import EndpointPool
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.first_token import FirstTokenWaits
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
    TransferDone,
)
from kvferry.transport.registrar import Registrar
from kvferry.transport.room import KVPoll, RoomVisits
from kvferry.transport.send_pipeline import SendPipeline
from kvferry.transport.send_room import KVWritten, Outgoing, SendRoom
from kvferry.transport.timeline import first, last
from kvferry.transport.tombstones import Tombstones

log = logging.getLogger(__name__)
# what a room that succeeded leaves behind: a late registration for it is refused with this
_FINISHED = Failure(FailureKind.REFUSED, "room already finished")


class PrefillAgent(TransferAgent):
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
        keys: CurveKeys | None = None,
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
            self.abort_on_loop,
            keys=keys,
        )
        self.config, self.layout, self.planes = config, layout, planes
        self.rooms: dict[int, SendRoom] = {}
        self.tombstones = Tombstones()
        self._visits = RoomVisits()  # rooms the next step advances (news of each, or a sweep)
        self._first_tokens = FirstTokenWaits(self.core.copies, self._visits.touch)
        self.pipeline = SendPipeline(self.core, config, self._fail, self._visits.touch)
        self.endpoints = EndpointPool(self.core, self._on_endpoint_error)
        self.registrar = Registrar(
            self.core,
            config,
            layout,
            planes,
            self.rooms,
            self.tombstones,
            self.endpoints,
            self._fail,
        )
        self._register(bootstrap, token)
        self.core.loop.start()

    def sender(self, room: int, num_tokens: int) -> KVSender:
        """The engine's handle for room `room`, whose prompt has `num_tokens` tokens."""
        handle = KVSender(self, room, num_tokens)
        self.core.loop.post(lambda: self._claim(handle))
        return handle

    def registered(self, room_id: int) -> bool:
        """Whether every decode rank has registered `room_id` — for a handle the loop thread has
        not claimed yet, read from the engine's thread (a stale answer only delays admission)."""
        room = self.rooms.get(room_id)
        return room is not None and room.registered and not room.status.finished

    def close(self) -> None:
        self.core.close()

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

    # --- engine-facing operations, run on the loop thread (post them) -------------------------

    def _claim(self, handle: KVSender) -> None:
        tomb = self.tombstones.pop(handle.room)
        room = self.rooms.get(handle.room)
        if room is None:
            room = self.rooms[handle.room] = SendRoom(
                handle.room, time.monotonic(), self.config, self.core.bell.ring
            )
        room.attach(handle)
        self._visits.touch(room.room)
        if tomb is not None:
            self._fail(room, tomb, notify=False)
        elif room.num_tokens is not None and room.num_tokens != handle.num_tokens:
            mismatch = f"mismatch: num_tokens {handle.num_tokens} at prefill "
            self._fail(
                room,
                Failure(FailureKind.INCOMPATIBLE, mismatch + f"vs {room.num_tokens} at decode"),
            )

    def add_tokens_on_loop(
        self,
        room_id: int,
        slots: np.ndarray,
        ready: KVWritten,
        first_token,
        last: bool,
        first_later: bool = False,
    ) -> None:
        """KVSender.add_tokens on the loop thread: queue `slots` (KV written once `ready`
        fires) for room `room_id`; a finished or unknown room ignores them."""
        room = self.rooms.get(room_id)
        if room is None or room.status.finished:
            return
        self._visits.touch(room_id)
        error = room.add_tokens(slots, ready, first_token, last, first_later)
        if error:
            self._fail(room, error)

    def first_token_on_loop(self, room_id: int, token, failed=None, why: str = "") -> None:
        """KVSender.first_token_is on the loop thread."""
        room = self.rooms.get(room_id)
        if room is not None and not room.status.finished:
            room.first_token_is(token, failed, why)
            self._visits.touch(room_id)

    def abort_on_loop(self, room_id: int, failure: Failure) -> None:
        """Fail room `room_id` with `failure` and tell its decode ranks; on the loop thread."""
        room = self.rooms.get(room_id)
        if room is not None:
            self._fail(room, failure)

    # --- control messages --------------------------------------------------------------------

    def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, RegisterRoom):
            self.registrar.register(peer, message)
            self._visits.touch(message.room)
        elif isinstance(message, Abort):
            self._on_abort(peer, message)
        elif isinstance(message, ErrorReply):
            self.core.log.warning("peer error", "peer %r reports: %s", peer, message.reason)
            if message.room is not None:
                self._on_abort(peer, Abort(message.room, message.reason))
        else:
            self.core.refuse(peer, f"unexpected {type(message).__name__} at a prefill rank")

    def _on_abort(self, peer: str, msg: Abort) -> None:
        room = self.rooms.get(msg.room)
        aborted = Failure(FailureKind.PEER_ABORTED, f"aborted by decode: {msg.reason}")
        if room is None:  # the engine may claim it yet: it must find the room failed
            self.tombstones.bury(msg.room, aborted, time.monotonic())
        else:
            self._fail(room, aborted, skip_peer=peer)

    def _on_peer_lost(self, peer: str, failure: Failure) -> None:
        for room in [
            r for r in self.rooms.values() if any(d.peer == peer for d in r.dests.values())
        ]:
            self._fail(room, failure, skip_peer=peer)

    def _on_endpoint_error(self, ucx_address: bytes, why: str) -> None:
        self.core.data.drop_endpoint(ucx_address)
        for room in [
            r
            for r in self.rooms.values()
            if any(d.ucx_address == ucx_address for d in r.dests.values())
        ]:
            self._fail(room, Failure(FailureKind.PEER_LOST, f"peer lost: {why}"))

    # --- progress ----------------------------------------------------------------------------

    def _step(self, now: float) -> bool:
        self.pipeline.step(now)
        self._first_tokens.touch_arrived(self.rooms)
        added = self.pipeline.added
        # after the pipeline: the rooms whose items it just finished are among those touched
        visited = self._advance_rooms(self._visits.take(self.rooms, now), now)
        if self.pipeline.added != added:
            # pieces the rooms just queued: start them now (no event would come for KV that is
            # written already), then finish the rooms whose last sends completed at once
            self.pipeline.step(now)
            visited += self._advance_rooms(self._visits.take_touched(), now)
        self._purge(visited, now)
        self.endpoints.reclaim(now)
        return self.pipeline.busy

    def _advance_rooms(self, room_ids: list[int], now: float) -> list[int]:
        """Advance the rooms `room_ids` (those gone are skipped); returns `room_ids`."""
        for room_id in room_ids:
            room = self.rooms.get(room_id)
            if room is None:
                continue
            try:
                self._advance(room, now)
            except Exception as exc:  # one room's failure is its own, never the thread's
                self._fail(room, self.core.contain(exc, f"room {room.room:#x}"))
        return room_ids

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
        first(room.marks, "prefill_registered")
        num_layers, groups = self.layout.num_layers, room.groups
        for chunk, slots, ready in self._messages(room, list(room.ready_chunks())):
            for g, layers in enumerate(groups):  # all of group g, then g + 1: the forward's order
                planes = self.planes.layers(layers, num_layers)
                for dest in room.dests.values():
                    if dest.slice is not None:
                        piece = chunk * len(groups) + g
                        item = (room, piece, self.layout.tp_rank, dest, slots, planes)
                        self.pipeline.add(Outgoing(*item, ready, layers.stop, now))
        if not room.done_sent and room.all_posted and self._first_tokens.readable(room):
            if room.first_draw_failed():
                self._fail(room, Failure(FailureKind.INTERNAL, room.first_failed_why))
                return
            self._send_done(room)
        if room.complete:
            room.status.advance(KVPoll.Success)
            self.core.stats.rooms_succeeded += 1
            self._release_peers(room)

    def _send_done(self, room: SendRoom) -> None:
        """Every send of the room is posted: TransferDone follows them on the same endpoints,
        read with the data's last message rather than in a decode turn of its own."""
        last(room.marks, "prefill_sent")
        done = TransferDone(
            room.room, self.layout.tp_rank, room.num_chunks, _token(room.first_token), room.marks
        )
        self.pipeline.send_done(room, self.core.control.codec.encode(done), self.layout.tp_rank)
        room.done_sent = True

    def _messages(self, room: SendRoom, chunks: list) -> Iterator[tuple[int, np.ndarray, object]]:
        """(first chunk, slots, ready) of each message to cut from `chunks` (chunk, slots,
        ready), chunks that became ready together: runs of them travel as one message, up to
        the size every decode rank of the room takes and half this rank's ring (none where a
        decode rank takes one chunk per message)."""
        limit = min(room.max_message_bytes or 0, self.config.ring_bytes // 2)
        if not limit or len(chunks) < 2:  # nothing to join: the common case costs nothing more
            yield from chunks
            return
        sizes = [
            self.planes.layers(layers, self.layout.num_layers).staging_bytes(1, d.slice.num_heads)
            for layers in room.groups
            for d in room.dests.values()
            if d.slice is not None
        ]
        most = limit // max(sizes) if sizes else 0  # tokens in one message
        start = 0
        while start < len(chunks):
            end, tokens = start + 1, len(chunks[start][1])
            while end < len(chunks) and tokens + len(chunks[end][1]) <= most:
                tokens += len(chunks[end][1])
                end += 1
            run = chunks[start:end]
            slots = run[0][1] if len(run) == 1 else np.concatenate([s for _, s, _ in run])
            yield run[0][0], slots, run[-1][2]  # the last one's ready covers the run
            start = end

    def _fail(
        self, room: SendRoom, failure: Failure, notify: bool = True, skip_peer: str | None = None
    ) -> None:
        if not room.status.fail(failure):
            return
        self.pipeline.close_group(room)  # what it posted wakes the loop as it completes
        self._visits.touch(room.room)  # to be purged once nothing of it is in flight
        self.core.stats.failed(failure)
        if room.handle is not None:  # a room only a peer opened is counted, not logged: peers
            log.info("room %#x failed: %s", room.room, failure)  # decide how many there are
        if notify:
            for dest in room.dests.values():
                if dest.peer != skip_peer:
                    self.core.control.send(dest.peer, Abort(room.room, str(failure)))
        self._release_peers(room)

    def _release_peers(self, room: SendRoom) -> None:
        for dest in room.dests.values():
            self.core.peers.remove_room(dest.peer, room.room)

    def _purge(self, room_ids: list[int], now: float) -> None:
        """Those of `room_ids` that finished become tombstones: late registrations or aborts
        must not open them again, and an engine claiming one late finds it failed."""
        for room_id in room_ids:
            room = self.rooms.get(room_id)
            if room is None or not room.status.finished or room.in_flight:
                continue
            del self.rooms[room_id]
            self.tombstones.bury(room_id, room.status.failure or _FINISHED, now)
            for dest in room.dests.values():  # nothing of it is in flight any more
                self.endpoints.release(dest.ucx_address, room_id, now)
        self.tombstones.expire(now)


def _token(token) -> int | None:
    """The first token as an int; the engine may hand over a host tensor that an asynchronous
    copy fills before the last chunk's `ready` event fires (long before this runs)."""
    return None if token is None else int(token)
