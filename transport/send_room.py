"""Per-room state on a prefill rank: its destinations, the prompt's KV as the engine adds it,
and the (piece, destination) work items cut from it — a piece being one chunk's layers, or one
layer group of them when the decode side asked for layer-wise messages."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvferry.staging.copy_stream import Fence
from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout, layer_groups
from kvferry.staging.plan import HeadSlice, cached_plan
from kvferry.transport.config import TransferConfig
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.messages import RegisterRoom
from kvferry.transport.room import RoomStatus
from kvferry.transport.tags import MAX_KEY, MAX_PIECES, MAX_WRITERS, pack_tag
from kvferry.transport.timeline import Marks

if TYPE_CHECKING:
    from kvferry.transport.slice_mode import SliceMode
    from kvferry.transport.staged_mode import StagedMode


class Dest:
    """One decode rank of a room, as its registration described it."""

    __slots__ = ("endpoint", "peer", "recv_key", "slice", "ucx_address")

    def __init__(
        self, peer: str, ucx_address: bytes, endpoint, recv_key: int, head_slice: HeadSlice | None
    ) -> None:
        self.peer, self.ucx_address, self.endpoint = peer, ucx_address, endpoint
        self.recv_key = recv_key
        self.slice = head_slice  # what this prefill rank sends it; None: nothing


class KVWritten:
    """When one forward's KV is in place: all of it once `fence` fires; layers [0, n) already
    once the fence paired with n in `layers` fires (ascending n; empty: no finer events).

    The engine may hand it over before it launches the forward and fill it in meanwhile, on its
    own thread: `layers_written` as each layer group is queued, `complete` once the whole
    forward is (which wakes the transfer thread). The transfer thread queues a layer range's
    gather behind the first fence covering it (`for_layers`), so on a device that runs behind
    the host the first layer groups travel while later layers compute."""

    __slots__ = ("at", "began", "fence", "layers")

    def __init__(
        self, fence: Fence | None = None, layers: list[tuple[int, Fence]] | None = None
    ) -> None:
        self.fence, self.layers = fence, layers if layers is not None else []
        self.at = time.time() if fence is not None else 0.0  # when the forward was queued
        self.began = time.time()  # when the engine began to launch it (handed over before that)

    def layers_written(self, layers: int, event: torch.cuda.Event) -> None:
        """Layers [0, `layers`) are written once `event` (recorded) fires."""
        self.layers.append((layers, Fence(event)))

    def complete(self, event: torch.cuda.Event | None) -> None:
        """The whole forward is queued; all of it is written once `event` fires (None: now)."""
        self.at = time.time()
        self.fence = Fence(event)

    def for_layers(self, end: int) -> Fence | None:
        """The earliest fence after which layers [0, end) are written; None while the forward
        that writes them is not queued yet."""
        for written, fence in list(self.layers):  # a snapshot: the engine may append
            if written >= end:
                return fence
        return self.fence


class Outgoing:
    """One piece for one destination, from the queue to a completed send."""

    __slots__ = (
        "dest",
        "fence",
        "layers_end",
        "offset",
        "planes",
        "posted",
        "queued",
        "region",
        "requests",
        "room",
        "slots",
        "staged",
        "tag",
        "todo",
        "waited",
        "written",
    )

    def __init__(
        self,
        room: SendRoom,
        piece: int,
        writer: int,
        dest: Dest,
        slots: np.ndarray,
        planes: KVPlanes,
        written: KVWritten,
        layers_end: int,
        queued: float,
    ) -> None:
        """`planes`: the piece's layers, all of [0, `layers_end`) written once `written`
        says so."""
        self.room, self.dest, self.slots, self.queued = room, dest, slots, queued
        self.planes, self.written, self.layers_end = planes, written, layers_end
        self.fence: Fence | None = None  # what its send waits for, once it is staged
        self.tag = pack_tag(dest.recv_key, piece, writer)
        self.offset: int | None = None  # staging ring region, while held
        self.region = None
        self.requests: deque = deque()
        self.todo = None  # its mode's payloads still to send
        self.staged = queued  # when its gather was queued
        self.waited = False
        self.posted = False  # all its sends are posted (or it left without any)


class SendRoom:
    def __init__(
        self, room: int, now: float, config: TransferConfig, notify: Callable[[], None]
    ) -> None:
        """`notify`: called on every change of the room's state."""
        self.room, self.created, self.config = room, now, config
        self.status = RoomStatus(notify)
        self.handle = None
        self.dests: dict[int, Dest] = {}
        self.num_tokens: int | None = None
        self.dst_tp: int | None = None
        self.chunk_tokens: int | None = None
        self.layer_group: int | None = None
        self.layer_taper = False
        self.groups: list[range] = []  # the layers of each piece of a chunk, once registered
        # the largest message every decode rank of the room takes (several chunks in one)
        self.max_message_bytes: int | None = None
        self.first_token: int | torch.Tensor | None = None
        self.first_token_wake: Fence | None = None  # asked for once its fence has to fire
        self.first_failed: torch.Tensor | None = None  # filled with the token: its draw failed
        self.first_failed_why = ""
        self.input_done = False
        self.first_known = False  # the first token is here (with the last tokens, or after)
        self.in_flight = 0  # work items queued, staged or sending; TransferDone sending
        self.unposted = 0  # work items whose sends are not all posted yet
        self.done_sent = False  # TransferDone is posted behind the data, to every destination
        self.marks: Marks = {}  # stages' times (timeline.py), sent with TransferDone
        self._slots: list[np.ndarray] = []
        self._ready: list[KVWritten] = []
        self._tokens_added = 0
        self._next_chunk = 0

    @property
    def registered(self) -> bool:
        return self.dst_tp is not None and len(self.dests) == self.dst_tp

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_tokens)

    @property
    def all_posted(self) -> bool:
        """Every piece's sends are posted, and the first token is known: TransferDone may
        follow them."""
        return (
            self.input_done
            and self.first_known
            and self._next_chunk == self.num_chunks
            and self.unposted == 0
        )

    @property
    def complete(self) -> bool:
        """Every send has completed, TransferDone's included."""
        return self.done_sent and self.in_flight == 0

    def attach(self, handle) -> None:
        self.handle = handle
        handle.status = self.status
        if self.num_tokens is None:
            self.num_tokens = handle.num_tokens

    def register(self, msg: RegisterRoom, num_layers: int) -> Failure | None:
        """Record one decode rank's registration; the failure if it contradicts the room."""
        if self.num_tokens is not None and msg.num_tokens != self.num_tokens:
            mismatch = (
                f"mismatch: num_tokens {msg.num_tokens} at decode vs {self.num_tokens} at prefill"
            )
            return Failure(FailureKind.INCOMPATIBLE, mismatch)
        proposal = (msg.layout.tp_size, msg.chunk_tokens, msg.layer_group, msg.layer_taper)
        if self.dst_tp is not None and proposal != (
            self.dst_tp,
            self.chunk_tokens,
            self.layer_group,
            self.layer_taper,
        ):
            return Failure(
                FailureKind.INCOMPATIBLE,
                "mismatch: decode ranks proposed different tp_size, chunk_tokens, layer_group "
                "or layer_taper",
            )
        if msg.layout.tp_rank in self.dests:
            return Failure(
                FailureKind.INCOMPATIBLE,
                f"mismatch: decode rank {msg.layout.tp_rank} registered twice",
            )
        self.num_tokens = msg.num_tokens
        self.dst_tp, self.chunk_tokens, self.layer_group, self.layer_taper = proposal
        if self.max_message_bytes is None or msg.max_message_bytes < self.max_message_bytes:
            self.max_message_bytes = msg.max_message_bytes
        self.groups = layer_groups(num_layers, msg.layer_group, msg.layer_taper)
        return None

    def add_tokens(
        self,
        slots: np.ndarray,
        ready: KVWritten,
        first_token: int | None,
        last: bool,
        first_later: bool = False,
    ) -> Failure | None:
        """`first_later`: the last tokens' first token comes with `first_token_is`."""
        if self.input_done:
            return Failure(FailureKind.INTERNAL, "engine error: tokens added after the last chunk")
        self._slots.append(slots)
        self._ready.append(ready)
        self._tokens_added += len(slots)
        if last:
            if self._tokens_added != self.num_tokens:
                end = self._tokens_added
                return Failure(
                    FailureKind.INTERNAL,
                    f"engine error: last chunk ends at token {end} of {self.num_tokens}",
                )
            self.input_done, self.first_token = True, first_token
            self.first_known = not first_later
        return None

    def first_token_is(self, token, failed=None, why: str = "") -> None:
        """`failed`: a host flag filled with the token, set where its draw failed (`why`)."""
        self.first_token, self.first_known = token, True
        self.first_failed, self.first_failed_why = failed, why

    def first_draw_failed(self) -> bool:
        """Whether the first token's draw failed (read once the token may be)."""
        return self.first_failed is not None and bool(self.first_failed)

    def first_token_fence(self) -> Fence | None:
        """What must fire before the first token can be read: an engine hands over a host
        tensor that a copy queued with the last chunk's forward fills, and that chunk's
        KVWritten fence covers the copy. None for a token known on the host."""
        if not isinstance(self.first_token, torch.Tensor) or not self._ready:
            return None
        return self._ready[-1].fence

    def ready_chunks(self):
        """(chunk, slots, ready) for every chunk whose tokens have all been added, in order."""
        while self.registered and self._next_chunk < self.num_chunks:
            start = self._next_chunk * self.chunk_tokens
            end = min(start + self.chunk_tokens, self.num_tokens)
            if self._tokens_added < end:
                return
            slots = np.concatenate(self._slots) if len(self._slots) > 1 else self._slots[0]
            ready = self._ready[-1]  # forwards run in order on one stream: the last covers all
            self._slots, self._ready = [slots[end - start :]], [ready]
            yield self._next_chunk, slots[: end - start], ready
            self._next_chunk += 1

    def expired(self, now: float) -> Failure | None:
        age = now - self.created
        if not self.registered or self.handle is None:
            if age > self.config.bootstrap_timeout_s:
                waiting = "the engine" if self.handle is None else "decode registrations"
                return Failure(
                    FailureKind.TIMEOUT,
                    f"timeout: room still waiting for {waiting} after {age:.1f}s",
                )
        elif age > self.config.transfer_timeout_s:
            return Failure(FailureKind.TIMEOUT, f"timeout: transfer unfinished after {age:.1f}s")
        return None


def check_registration(
    msg: RegisterRoom,
    layout: KVLayout,
    planes: KVPlanes,
    config: TransferConfig,
    mode: StagedMode | SliceMode,
) -> Failure | None:
    """Why a decode rank's registration cannot be served here (`mode`: this rank's
    `StagedMode` or `SliceMode`), or None."""
    if msg.mode != config.mode:
        return Failure(
            FailureKind.INCOMPATIBLE,
            f"mismatch: mode {msg.mode!r} at decode vs {config.mode!r} at prefill",
        )
    mismatch = layout.mismatch(msg.layout)
    if mismatch:
        return Failure(FailureKind.INCOMPATIBLE, f"incompatible: {mismatch}")
    if layout.tp_size > MAX_WRITERS:
        return Failure(
            FailureKind.INCOMPATIBLE,
            f"unsupported: prefill tp_size {layout.tp_size} exceeds {MAX_WRITERS}",
        )
    if (
        msg.num_tokens < 1
        or msg.chunk_tokens < 1
        or not 0 <= msg.recv_key <= MAX_KEY
        or msg.layer_group < 0
        or (msg.layer_group and msg.mode == "slice")
        or msg.max_message_bytes < 0
    ):
        invalid = (
            f"invalid: num_tokens={msg.num_tokens} chunk_tokens={msg.chunk_tokens} "
            f"recv_key={msg.recv_key} layer_group={msg.layer_group} "
            f"max_message_bytes={msg.max_message_bytes} (mode {msg.mode!r})"
        )
        return Failure(FailureKind.BAD_MESSAGE, invalid)
    groups = layer_groups(layout.num_layers, msg.layer_group, msg.layer_taper)
    if -(-msg.num_tokens // msg.chunk_tokens) * len(groups) > MAX_PIECES:
        pieces = f"{msg.num_tokens} tokens in chunks of {msg.chunk_tokens}"
        pieces += f" x {len(groups)} layer groups"
        return Failure(
            FailureKind.INCOMPATIBLE,
            f"unsupported: {pieces} exceed {MAX_PIECES} messages per writer",
        )
    try:
        plan = cached_plan(layout.num_kv_heads, layout.tp_size, msg.layout.tp_size, layout.mla)
    except ValueError as exc:
        return Failure(FailureKind.INCOMPATIBLE, f"incompatible: {exc}")
    widest = max(s.num_heads for s in plan)
    largest = planes.layers(groups[0], layout.num_layers)  # the first group is never smaller
    need = largest.staging_bytes(min(msg.chunk_tokens, msg.num_tokens), widest)
    return mode.ring_too_small(need, config)
