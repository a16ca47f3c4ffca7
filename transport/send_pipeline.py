"""Prefill rank's send pipeline: (piece, destination) items go from a queue, through their
mode's staging (a gather into the staging ring: `staged_mode.py`), to completed sends.

Every stage is polled, oldest first; nothing waits on the host. An item that finds the ring
full stays at the head of the queue (later items wait behind it, so space is not starved by
smaller ones) for at most ring_wait_timeout_s, then fails its room.

A room's sends, its TransferDone notes last, form one group of the data plane, closed once the
notes are posted (or the room failed): their completions wake the loop once,
when the last is in or one failed; each frees its ring region in whichever turn comes first.
While an item waits for ring room, every completion wakes it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from kvferry.transport.config import TransferConfig
from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import failure
from kvferry.transport.failure import Failure, ring_full
from kvferry.transport.room import KVPoll
from kvferry.transport.send_room import Outgoing, SendRoom
from kvferry.transport.tags import DONE_PIECE, pack_tag
from kvferry.transport.timeline import first, last

SENDS_PER_TURN = 256  # bounds one turn, so heartbeats and other rooms keep going


class SendPipeline:
    def __init__(
        self,
        core: AgentCore,
        config: TransferConfig,
        fail_room: Callable[[object, Failure], None],
        touch: Callable[[int], None],
    ) -> None:
        """`touch(room id)`: something happened to the room (an item of it left)."""
        self.core = core
        self.staging, self.mode, self.data, self.stats = (
            core.staging,
            core.mode,
            core.data,
            core.stats,
        )
        self.config, self._fail_room, self._touch = config, fail_room, touch
        self._queue: deque[Outgoing] = deque()  # waiting for staging room, oldest first
        self._staged: deque[Outgoing] = deque()  # gathered (or gathering), not yet sent
        self._sending: deque[Outgoing] = deque()  # sent, not yet completed
        self._ring_waiting = False  # the queue's head waits for ring room (a timeout runs)
        self._notes: deque = deque()  # (room, request, buffer) of TransferDone sends posted
        self._groups: dict[SendRoom, object] = {}  # the data plane's group of a room sending
        self._all_loud = False  # what the data plane was told: every completion wakes the loop
        self.added = 0  # items ever queued

    def add(self, item: Outgoing) -> None:
        item.room.in_flight += 1
        item.room.unposted += 1
        self._queue.append(item)
        self.added += 1

    def send_done(self, room: SendRoom, payload: bytes, writer: int) -> None:
        """Post `payload`, the room's encoded TransferDone, to each destination behind the
        room's data on the same endpoint (tags.DONE_PIECE), the last of its group; the room is
        in flight until they have gone."""
        group = self._group(room)
        try:
            for dest in room.dests.values():
                buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                tag = pack_tag(dest.recv_key, DONE_PIECE, writer)
                request = self.data.send_note(dest.endpoint, buffer, tag, group)
                room.in_flight += 1
                self._notes.append((room, request, buffer))
        finally:
            self.close_group(room)

    def _group(self, room: SendRoom) -> object:
        """The data plane's group of `room`'s sends, opened with its first (None: none)."""
        group = self._groups.get(room)
        if group is None and not room.status.finished:
            group = self.data.open_group()
            if group is not None:
                self._groups[room] = group
        return group

    def close_group(self, room: SendRoom) -> None:
        """`room` posts nothing more (its notes went, or it failed): its group's last
        completion wakes the loop (at once, if all are in already)."""
        group = self._groups.pop(room, None)
        if group is not None:
            self.data.close_group(group)

    @property
    def busy(self) -> bool:
        """Whether operations are in flight (or a ring wait's timeout runs): the loop keeps a
        timer. Items whose KV is not yet queued on the device are not: the engine wakes the
        loop when it queues them."""
        return bool(self._staged or self._sending or self._ring_waiting or self._notes)

    def step(self, now: float) -> None:
        """Advance every item that can move."""
        self._stage(now)
        self._send_staged()
        self._complete_sends()
        self._complete_notes()
        if self._all_loud != self._ring_waiting:
            self._all_loud = self._ring_waiting
            self.data.all_loud(self._all_loud)

    def _stage(self, now: float) -> None:
        """Stage queued items (gather them into the ring), oldest first, while it has room;
        the loop is woken once what was staged is ready to send."""
        try:
            self._stage_queued(now)
        finally:
            self.mode.wake()

    def _stage_queued(self, now: float) -> None:
        self._ring_waiting = False
        while self._queue:
            item = self._queue[0]
            if item.room.status.finished:
                self._release(self._queue.popleft())
                continue
            written = item.fence = item.written.for_layers(item.layers_end)
            if written is None:  # its layers are not queued on the device yet: wait for them
                return
            if item.written.fence is written:  # the whole forward is queued
                first(item.room.marks, "prefill_scheduled", item.written.began)
                first(item.room.marks, "prefill_first_forward", item.written.at)
                last(item.room.marks, "prefill_last_forward", item.written.at)
            if not self.mode.stage(item):
                self._wait_for_ring(item, now)
                return
            self._queue.popleft()
            self._note_ring_wait(item, now)
            item.staged = now
            item.room.status.advance(KVPoll.Transferring)
            self._staged.append(item)

    def _wait_for_ring(self, item: Outgoing, now: float) -> None:
        self._ring_waiting = True
        if not item.waited:
            item.waited = True
            self.stats.ring_waits += 1
        if now - item.queued > self.config.ring_wait_timeout_s:
            self._release(self._queue.popleft())
            self._fail_room(item.room, ring_full(self.config.ring_wait_timeout_s))

    def _note_ring_wait(self, item: Outgoing, now: float) -> None:
        if item.waited:
            self.stats.ring_wait_s += now - item.queued

    def _send_staged(self) -> None:
        while self._staged and self._staged[0].fence.done():
            item = self._staged.popleft()
            item.queued = time.monotonic()
            self.stats.copy_s += item.queued - item.staged
            last(item.room.marks, "prefill_gathered")
            if item.room.status.finished:
                self._release(item)
                continue
            item.todo = self.mode.payloads(item)
            self._sending.append(item)

    def _complete_sends(self) -> None:
        budget = SENDS_PER_TURN
        for _ in range(len(self._sending)):
            item = self._sending.popleft()
            budget -= self._post_sends(item, budget)
            if budget <= 0 and item.todo is not None:
                self.core.again = True  # the rest in the next turn, after the others' news
            elif item.todo is None:
                self._posted(item)
            while item.requests and item.requests[0].done():
                error = item.requests.popleft().error()
                if error and not item.room.status.finished:
                    self._fail_room(item.room, failure("send", error))
            if item.requests or item.todo is not None:
                self._sending.append(item)
                continue
            self.stats.wire_s += time.monotonic() - item.queued
            self._release(item)

    def _posted(self, item: Outgoing) -> None:
        """`item`'s sends are all posted (or it leaves without them): once every item of its
        room is, TransferDone may follow."""
        if not item.posted:
            item.posted = True
            item.room.unposted -= 1
            if item.room.unposted == 0:
                self._touch(item.room.room)

    def _complete_notes(self) -> None:
        for _ in range(len(self._notes)):
            room, request, buffer = self._notes.popleft()
            if not request.done():
                self._notes.append((room, request, buffer))
                continue
            error = request.error()
            if error and not room.status.finished:
                self._fail_room(room, failure("send", error))
            room.in_flight -= 1
            self._touch(room.room)

    def _post_sends(self, item: Outgoing, budget: int) -> int:
        """Post up to `budget` of `item`'s sends still to go; how many were posted."""
        posted = 0
        while item.todo is not None and posted < budget:
            payload = next(item.todo, None)
            if payload is None or item.room.status.finished:
                item.todo = None
                break
            group = self._group(item.room)
            item.requests.append(self.data.send(item.dest.endpoint, payload, item.tag, group))
            posted += 1
        return posted

    def _release(self, item: Outgoing) -> None:
        self._posted(item)
        if item.offset is not None:
            self.staging.free(item.offset)
            item.offset = None
        item.room.in_flight -= 1
        self._touch(item.room.room)
