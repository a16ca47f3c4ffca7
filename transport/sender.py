"""Prefill side: gathers each chunk's head slices into the staging ring and sends each
(chunk, destination) region as one tagged message (or, in slice mode, one message per token and
plane straight from the cache)."""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np
import torch

from kvferry.staging.copy_stream import Fence
from kvferry.staging.kv_copy import KVPlanes, host_slots
from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import plan_head_transfers
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import request
from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import DataPlane
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
from kvferry.transport.room import KVPoll, TransferFailed
from kvferry.transport.send_room import Dest, Outgoing, SendRoom, check_registration

log = logging.getLogger(__name__)
SLICE_SENDS_PER_TURN = 256
TOMBSTONE_S = 600.0  # how long a finished room is remembered (late messages must not reopen it)


class PrefillAgent:
    """One prefill rank's transfer agent; registers with the bootstrap server on start."""

    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        planes: KVPlanes,
        data: DataPlane,
        bootstrap: str,
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
        )
        self.config, self.layout, self.planes = config, layout, planes
        self.rooms: dict[int, SendRoom] = {}
        self._tombstones: dict[int, tuple[str, float]] = {}
        self._queue: deque[Outgoing] = deque()  # waiting for staging room, oldest first
        self._staged: deque[Outgoing] = deque()  # gathered (or gathering), not yet sent
        self._sending: deque[Outgoing] = deque()  # sent, not yet completed
        self._register(bootstrap)
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

    def _register(self, bootstrap: str) -> None:
        info = RankInfo(self.layout, self.core.data.address, self.core.control.address)
        codec = Codec(self.config.max_frame_bytes)
        reply = request(
            self.core.zmq_context,
            codec,
            bootstrap,
            RegisterRank(info),
            self.config.bootstrap_timeout_s,
        )
        if not isinstance(reply, Ack):
            raise RuntimeError(
                f"bootstrap server {bootstrap} refused rank {self.layout.tp_rank}: {reply}"
            )

    # --- engine-facing operations, run on the loop thread -----------------------------------

    def _claim(self, handle: KVSender) -> None:
        tomb = self._tombstones.pop(handle.room, None)
        room = self.rooms.get(handle.room)
        if room is None:
            room = self.rooms[handle.room] = SendRoom(handle.room, time.monotonic(), self.config)
        room.attach(handle)
        if tomb is not None:
            self._fail(room, tomb[0], notify=False)
        elif room.num_tokens is not None and room.num_tokens != handle.num_tokens:
            self._fail(
                room,
                f"mismatch: num_tokens {handle.num_tokens} at prefill "
                f"vs {room.num_tokens} at decode",
            )

    def _add_tokens(self, room_id: int, slots: np.ndarray, fence: Fence, first_token, last) -> None:
        room = self.rooms.get(room_id)
        if room is None or room.status.finished:
            return
        error = room.add_tokens(slots, fence, first_token, last)
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
            log.warning("peer %s reports an error: %s", peer, message.reason)
            if message.room is not None:
                self._on_abort(peer, Abort(message.room, message.reason))
        else:
            self.core.stats.bad_frames += 1
            self.core._reply_error(peer, f"unexpected {type(message).__name__} at a prefill rank")

    def _on_register(self, peer: str, msg: RegisterRoom) -> None:
        error = check_registration(msg, self.layout, self.planes, self.config)
        room = self.rooms.get(msg.room)
        if room is None and msg.room not in self._tombstones:
            room = self.rooms[msg.room] = SendRoom(msg.room, time.monotonic(), self.config)
        if room is None or room.status.finished:
            reason = room.status.reason if room else self._tombstones[msg.room][0]
            self.core.control.send(peer, ErrorReply(reason or "room already finished", msg.room))
            return
        error = error or room.register(msg)
        if error:
            self.core.control.send(peer, ErrorReply(error, msg.room))
            self._fail(room, error, notify=True)
            return
        plan = plan_head_transfers(
            self.layout.num_kv_heads, self.layout.tp_size, msg.layout.tp_size, self.layout.mla
        )
        mine = [
            s
            for s in plan
            if s.src_rank == self.layout.tp_rank and s.dst_rank == msg.layout.tp_rank
        ]
        endpoint = self.core.endpoint(msg.ucx_address, self._on_endpoint_error)
        room.dests[msg.layout.tp_rank] = Dest(
            peer, msg.ucx_address, endpoint, msg.recv_key, mine[0] if mine else None
        )
        self.core.peers.add_room(peer, msg.room)
        self.core.control.send(peer, RoomAccepted(msg.room, self.layout.tp_rank))

    def _on_abort(self, peer: str, msg: Abort) -> None:
        room = self.rooms.get(msg.room)
        reason = f"aborted by decode: {msg.reason}"
        if room is None:
            self._tombstones[msg.room] = (reason, time.monotonic())
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
        for room in list(self.rooms.values()):
            self._advance(room, now)
        self._stage(now)
        self._send_staged()
        self._complete_sends()
        self._purge(now)
        return bool(self._queue or self._staged or self._sending)

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
        for chunk, slots, fence in room.ready_chunks():
            for dest in room.dests.values():
                if dest.slice is not None:
                    self._queue.append(
                        Outgoing(room, chunk, self.layout.tp_rank, dest, slots, fence, now)
                    )
                    room.in_flight += 1
        if room.complete:
            for dest in room.dests.values():
                self.core.control.send(
                    dest.peer,
                    TransferDone(room.room, self.layout.tp_rank, room.num_chunks, room.first_token),
                )
            room.status.advance(KVPoll.Success)
            self.core.stats.rooms_succeeded += 1
            self._release_peers(room)

    def _stage(self, now: float) -> None:
        """Gather queued chunks into the ring, oldest first, while it has room."""
        while self._queue:
            item = self._queue[0]
            if item.room.status.finished:
                self._release(self._queue.popleft())
                continue
            if self.config.mode == "slice":
                self._staged.append(self._queue.popleft())
                continue
            nbytes = self.planes.staging_bytes(len(item.slots), item.dest.slice.num_heads)
            offset = self.core.staging.alloc(nbytes)
            if offset is None:
                self._wait_for_ring(item, now)
                return
            self._queue.popleft()
            self._note_ring_wait(item, now)
            item.offset = offset
            item.staged = now
            item.region = self.core.staging.view(offset, nbytes)
            item.fence = self.core.copies.gather(
                self.planes,
                item.slots,
                item.dest.slice.src_head_start,
                item.dest.slice.num_heads,
                item.region,
                after=item.fence,
            )
            item.room.status.advance(KVPoll.Transferring)
            self._staged.append(item)

    def _wait_for_ring(self, item: Outgoing, now: float) -> None:
        if not item.waited:
            item.waited = True
            self.core.stats.ring_waits += 1
        if now - item.queued > self.config.ring_wait_timeout_s:
            self._release(self._queue.popleft())
            self._fail(
                item.room, f"ring full: no staging room for {self.config.ring_wait_timeout_s:g}s"
            )

    def _note_ring_wait(self, item: Outgoing, now: float) -> None:
        if item.waited:
            self.core.stats.ring_wait_s += now - item.queued

    def _send_staged(self) -> None:
        while self._staged and self._staged[0].fence.done():
            item = self._staged.popleft()
            item.queued = time.monotonic()
            self.core.stats.copy_s += item.queued - item.staged
            if item.room.status.finished:
                self._release(item)
                continue
            if self.config.mode == "slice":
                item.room.status.advance(KVPoll.Transferring)
                item.todo = self._slice_rows(item)
            else:
                item.requests = deque(
                    [self.core.data.send(item.dest.endpoint, item.region, item.tag)]
                )
            self._sending.append(item)

    def _slice_rows(self, item: Outgoing):
        """Slice mode: one message per (plane, token), in that order, straight from the cache."""
        s = item.dest.slice
        slots = item.slots.tolist()
        for plane in self.planes.planes:
            heads = plane.narrow(1, s.src_head_start, s.num_heads)  # [slots, h, D]
            for slot in slots:
                yield heads[slot]

    def _complete_sends(self) -> None:
        budget = SLICE_SENDS_PER_TURN  # bounds a turn, so heartbeats and other rooms keep going
        for _ in range(len(self._sending)):
            item = self._sending.popleft()
            budget -= self._post_rows(item, budget)
            while item.requests and item.requests[0].done():
                error = item.requests.popleft().error()
                if error and not item.room.status.finished:
                    self._fail(item.room, f"send failed: {error}")
            if item.requests or item.todo is not None:
                self._sending.append(item)
                continue
            self.core.stats.wire_s += time.monotonic() - item.queued
            self._release(item)

    def _post_rows(self, item: Outgoing, budget: int) -> int:
        posted = 0
        while item.todo is not None and posted < budget:
            row = next(item.todo, None)
            if row is None or item.room.status.finished:
                item.todo = None
                break
            item.requests.append(self.core.data.send(item.dest.endpoint, row, item.tag))
            posted += 1
        return posted

    def _release(self, item: Outgoing) -> None:
        if item.offset is not None:
            self.core.staging.free(item.offset)
            item.offset = None
        item.room.in_flight -= 1

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
        for room_id in [
            r
            for r, room in self.rooms.items()
            if room.status.finished
            and room.in_flight == 0
            and (room.handle is not None or now - room.created > TOMBSTONE_S)
        ]:
            room = self.rooms.pop(room_id)
            # late registrations or aborts for the room must not open it again
            self._tombstones[room_id] = (room.status.reason or "room already finished", now)
        for room_id in [r for r, (_, t) in self._tombstones.items() if now - t > TOMBSTONE_S]:
            del self._tombstones[room_id]


class KVSender:
    """The engine's handle on one room at a prefill rank. Thread-safe; never blocks."""

    def __init__(self, agent: PrefillAgent, room: int, num_tokens: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        self.agent, self.room, self.num_tokens = agent, room, num_tokens
        self.status = None  # the room's RoomStatus, set on the loop thread
        self._tokens = 0

    def add_tokens(
        self,
        slots,
        ready: torch.cuda.Event | None = None,
        *,
        first_token: int | None = None,
        last: bool = False,
    ) -> None:
        """KV of the next len(slots) prompt tokens is (or, once `ready` fires, will be) in
        `slots`; `last` with the prompt's final tokens, carrying the sampled `first_token`."""
        if self.poll() == KVPoll.Failed:
            raise TransferFailed(self.failure_reason)
        slots = host_slots(slots).copy()
        self._tokens += len(slots)
        if self._tokens > self.num_tokens:
            raise ValueError(
                f"room {self.room:#x}: {self._tokens} tokens added, "
                f"the prompt has {self.num_tokens}"
            )
        fence = Fence(ready)
        self.agent.core.loop.post(
            lambda: self.agent._add_tokens(self.room, slots, fence, first_token, last)
        )

    def poll(self) -> KVPoll:
        if self.status is None:
            return self._loop_state(KVPoll.Bootstrapping)
        return self._loop_state(self.status.state)

    @property
    def failure_reason(self) -> str | None:
        if self.status is not None and self.status.reason:
            return self.status.reason
        return _loop_failure(self.agent.core)

    def abort(self, reason: str = "aborted by the prefill engine") -> None:
        self.agent.core.loop.post(lambda: self.agent._abort(self.room, reason))

    def _loop_state(self, state: KVPoll) -> KVPoll:
        if state < KVPoll.Success and _loop_failure(self.agent.core):
            return KVPoll.Failed
        return state


def _loop_failure(core: AgentCore) -> str | None:
    if core.loop.error is not None:
        return f"transfer thread died: {core.loop.error!r}"
    return None
