"""Per-room state on a prefill rank: its destinations, the prompt's KV as the engine adds it,
and the (chunk, destination) work items cut from it."""

from __future__ import annotations

from collections import deque

import numpy as np

from kvferry.staging.copy_stream import Fence
from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import HeadSlice, plan_head_transfers
from kvferry.transport.config import TransferConfig
from kvferry.transport.messages import RegisterRoom
from kvferry.transport.room import RoomStatus
from kvferry.transport.tags import MAX_CHUNKS, MAX_KEY, MAX_WRITERS, pack_tag


class Dest:
    """One decode rank of a room, as its registration described it."""

    __slots__ = ("endpoint", "peer", "recv_key", "slice", "ucx_address")

    def __init__(
        self, peer: str, ucx_address: bytes, endpoint, recv_key: int, head_slice: HeadSlice | None
    ) -> None:
        self.peer, self.ucx_address, self.endpoint = peer, ucx_address, endpoint
        self.recv_key = recv_key
        self.slice = head_slice  # what this prefill rank sends it; None: nothing


class Outgoing:
    """One chunk for one destination, from the queue to a completed send."""

    __slots__ = (
        "dest",
        "fence",
        "offset",
        "queued",
        "region",
        "requests",
        "room",
        "slots",
        "staged",
        "tag",
        "todo",
        "waited",
    )

    def __init__(
        self,
        room: SendRoom,
        chunk: int,
        writer: int,
        dest: Dest,
        slots: np.ndarray,
        fence: Fence,
        queued: float,
    ) -> None:
        self.room, self.dest, self.slots, self.fence, self.queued = room, dest, slots, fence, queued
        self.tag = pack_tag(dest.recv_key, chunk, writer)
        self.offset: int | None = None  # staging ring region, while held
        self.region = None
        self.requests: deque = deque()
        self.todo = None  # slice mode: rows still to send
        self.staged = queued  # when its gather was queued
        self.waited = False


class SendRoom:
    def __init__(self, room: int, now: float, config: TransferConfig) -> None:
        self.room, self.created, self.config = room, now, config
        self.status = RoomStatus()
        self.handle = None
        self.dests: dict[int, Dest] = {}
        self.num_tokens: int | None = None
        self.dst_tp: int | None = None
        self.chunk_tokens: int | None = None
        self.first_token: int | None = None
        self.input_done = False
        self.in_flight = 0  # work items queued, staged or sending
        self._slots: list[np.ndarray] = []
        self._fences: list[Fence] = []
        self._tokens_added = 0
        self._next_chunk = 0

    @property
    def registered(self) -> bool:
        return self.dst_tp is not None and len(self.dests) == self.dst_tp

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_tokens)

    @property
    def complete(self) -> bool:
        return self.input_done and self._next_chunk == self.num_chunks and self.in_flight == 0

    def attach(self, handle) -> None:
        self.handle = handle
        handle.status = self.status
        if self.num_tokens is None:
            self.num_tokens = handle.num_tokens

    def register(self, msg: RegisterRoom) -> str | None:
        """Record one decode rank's registration; an error string if it contradicts the room."""
        if self.num_tokens is not None and msg.num_tokens != self.num_tokens:
            return (
                f"mismatch: num_tokens {msg.num_tokens} at decode vs {self.num_tokens} at prefill"
            )
        if self.dst_tp is not None and (msg.layout.tp_size, msg.chunk_tokens) != (
            self.dst_tp,
            self.chunk_tokens,
        ):
            return "mismatch: decode ranks registered different tp_size or chunk_tokens"
        if msg.layout.tp_rank in self.dests:
            return f"mismatch: decode rank {msg.layout.tp_rank} registered twice"
        self.num_tokens, self.dst_tp, self.chunk_tokens = (
            msg.num_tokens,
            msg.layout.tp_size,
            msg.chunk_tokens,
        )
        return None

    def add_tokens(
        self, slots: np.ndarray, fence: Fence, first_token: int | None, last: bool
    ) -> str | None:
        if self.input_done:
            return "engine error: tokens added after the last chunk"
        self._slots.append(slots)
        self._fences.append(fence)
        self._tokens_added += len(slots)
        if last:
            if self._tokens_added != self.num_tokens:
                end = self._tokens_added
                return f"engine error: last chunk ends at token {end} of {self.num_tokens}"
            self.input_done, self.first_token = True, first_token
        return None

    def ready_chunks(self):
        """(chunk, slots, fence) for every chunk whose tokens have all been added, in order."""
        while self.registered and self._next_chunk < self.num_chunks:
            start = self._next_chunk * self.chunk_tokens
            end = min(start + self.chunk_tokens, self.num_tokens)
            if self._tokens_added < end:
                return
            slots = np.concatenate(self._slots) if len(self._slots) > 1 else self._slots[0]
            fence = self._fences[-1]  # forwards run in order on one stream: the last covers all
            self._slots, self._fences = [slots[end - start :]], [fence]
            yield self._next_chunk, slots[: end - start], fence
            self._next_chunk += 1

    def expired(self, now: float) -> str | None:
        age = now - self.created
        if not self.registered or self.handle is None:
            if age > self.config.bootstrap_timeout_s:
                waiting = "the engine" if self.handle is None else "decode registrations"
                return f"timeout: room still waiting for {waiting} after {age:.1f}s"
        elif age > self.config.transfer_timeout_s:
            return f"timeout: transfer unfinished after {age:.1f}s"
        return None


def check_registration(
    msg: RegisterRoom, layout: KVLayout, planes: KVPlanes, config: TransferConfig
) -> str | None:
    """Why a decode rank's registration cannot be served here, or None."""
    if msg.mode != config.mode:
        return f"mismatch: mode {msg.mode!r} at decode vs {config.mode!r} at prefill"
    mismatch = layout.mismatch(msg.layout)
    if mismatch:
        return f"incompatible: {mismatch}"
    if layout.tp_size > MAX_WRITERS:
        return f"unsupported: prefill tp_size {layout.tp_size} exceeds {MAX_WRITERS}"
    if msg.num_tokens < 1 or msg.chunk_tokens < 1 or msg.recv_key > MAX_KEY or msg.recv_key < 0:
        return (
            f"invalid: num_tokens={msg.num_tokens} chunk_tokens={msg.chunk_tokens} "
            f"recv_key={msg.recv_key}"
        )
    if -(-msg.num_tokens // msg.chunk_tokens) > MAX_CHUNKS:
        chunks = f"{msg.num_tokens} tokens in chunks of {msg.chunk_tokens}"
        return f"unsupported: {chunks} exceed {MAX_CHUNKS} chunks"
    try:
        plan = plan_head_transfers(
            layout.num_kv_heads, layout.tp_size, msg.layout.tp_size, layout.mla
        )
    except ValueError as exc:
        return f"incompatible: {exc}"
    widest = max(s.num_heads for s in plan)
    need = planes.staging_bytes(min(msg.chunk_tokens, msg.num_tokens), widest)
    if config.mode == "staged" and need > config.staging_bytes:
        return f"ring too small: a chunk needs {need} bytes, the ring holds {config.staging_bytes}"
    return None
