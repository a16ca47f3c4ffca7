"""Per-room state on a decode rank: which prefill ranks write which heads, what has arrived,
and the checks every arriving message must pass before a byte of it is taken."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.plan import HeadSlice
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.room import RoomStatus
from kvferry.transport.timeline import Marks

if TYPE_CHECKING:
    from kvferry.staging.copy_stream import Fence
    from kvferry.transport.slice_mode import SliceMode
    from kvferry.transport.staged_mode import StagedMode


class Piece(NamedTuple):
    """What one checked message carries: whose heads, which tokens, which layers' planes."""

    slice: HeadSlice
    slots: np.ndarray
    planes: KVPlanes
    index: int  # which of the piece's messages (several per piece in slice mode)
    first: int  # where its slots start in the room's
    # the (piece, writer) keys of `RecvRoom.taken` it counts in: one, or one per chunk of a
    # message that carries several chunks (`RecvRoom.expect`)
    keys: tuple[tuple[int, int], ...] = ()

    @property
    def units(self) -> int:
        """How many of the room's messages this one stands for."""
        return max(1, len(self.keys))


class Arrival:
    """A data message being taken in: its receive, then what its mode does once it is in."""

    __slots__ = (
        "ahead", "chained", "fence", "offset", "piece", "region", "request", "revoked", "room",
        "started",
    )  # fmt: skip

    def __init__(self, room: RecvRoom, piece: Piece) -> None:
        self.room, self.piece = room, piece
        self.offset: int | None = None  # staging ring region, while held
        self.region = None
        self.request = None
        self.fence = None
        self.chained = None  # a scatter its receive's completion launches (staged_mode.chain)
        self.started = 0.0  # when its receive (then its scatter) was posted
        self.ahead = False  # its receive was posted before the message came (no probe)
        self.revoked = False  # ... and cancelled to give its region back (the ring was full)


class RecvRoom:
    def __init__(
        self,
        handle,
        key: int,
        chunk_tokens: int,
        groups: list[range],
        created: float,
        notify: Callable[[], None],
    ) -> None:
        """`notify`: called on every change of the room's state."""
        self.handle, self.room, self.key = handle, handle.room, key
        self.num_tokens, self.slots, self.chunk_tokens = (
            handle.num_tokens,
            handle.slots,
            chunk_tokens,
        )
        self.groups = groups  # the layers of each message of a chunk (one group: all layers)
        # the largest message that may carry several chunks (the registration's
        # max_message_bytes; 0: one chunk per message)
        self.max_message_bytes = 0
        self.created = created
        self.status = RoomStatus(notify)
        handle.status = self.status
        self.writers: dict[int, HeadSlice] = {}  # prefill rank -> the heads it sends us
        self.rank_peers: dict[int, str] = {}  # prefill rank -> its control address
        self.accepted: set[str] = set()  # the prefill ranks (control addresses) that accepted
        self.first_tokens: dict[int, int | None] = {}  # TransferDone per prefill rank
        self.taken: dict[tuple[int, int], int] = {}  # (piece, writer) -> messages taken
        self.received_units = 0  # messages received (their KV in the ring or in place)
        self.landed_units = 0  # of which in the cache, or scattered there by queued work
        self.kv_fence: Fence | None = None  # the last scatter queued (they run in order)
        # the slots on the device (tensor, address), for scatters native code launches
        self.device_slots: tuple | None = None
        self.busy = 0  # receives or scatters that may still write into the KV pages or ring
        self.failing: Failure | None = None
        self.marks: Marks = {}  # stages' times (timeline.py), handed to the engine at Success

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_tokens)

    @property
    def open(self) -> bool:
        """Still taking messages."""
        return self.failing is None and not self.status.finished

    @property
    def all_accepted(self) -> bool:
        """Every prefill rank accepted the registration (its heartbeat named the room, or its
        TransferDone came)."""
        return bool(self.rank_peers) and len(self.accepted) == len(self.rank_peers)

    def chunk_slots(self, chunk: int) -> np.ndarray:
        start = chunk * self.chunk_tokens
        return self.slots[start : min(start + self.chunk_tokens, self.num_tokens)]

    def messages(self, planes: KVPlanes) -> Iterator[tuple[int, int, Piece, int]]:
        """(piece, writer, what it carries, bytes) of every staged message of a chunk of its
        own the room takes, in the order they come (chunk, layer group, writer): what `expect`
        would answer for each, none counted as taken (`take` does that)."""
        groups = [planes.layers(layers, self.groups[-1].stop) for layers in self.groups]
        writers = sorted(self.writers.items())
        for chunk in range(self.num_chunks):
            slots, first = self.chunk_slots(chunk), chunk * self.chunk_tokens
            for group, group_planes in enumerate(groups):
                piece = chunk * len(groups) + group
                for writer, head_slice in writers:
                    carried = Piece(head_slice, slots, group_planes, 0, first, ((piece, writer),))
                    yield (
                        piece,
                        writer,
                        carried,
                        group_planes.staging_bytes(len(slots), head_slice.num_heads),
                    )

    def take(self, piece: Piece) -> None:
        """`piece` (from `expect` or `messages`) is being taken: the counterpart of `untake`."""
        for key in piece.keys:
            self.taken[key] = self.taken.get(key, 0) + 1

    def expect(
        self,
        piece: int,
        writer: int,
        nbytes: int,
        planes: KVPlanes,
        mode: StagedMode | SliceMode,
    ) -> tuple[Failure | None, Piece | None]:
        """Check a message of `nbytes` for (piece, writer), every field of which comes from the
        peer. Returns (error, what the message carries)."""
        head_slice = self.writers.get(writer)
        if head_slice is None:
            return Failure(
                FailureKind.BAD_MESSAGE,
                f"protocol: prefill rank {writer} sends no heads to this rank",
            ), None
        chunk, group = divmod(piece, len(self.groups))
        if chunk >= self.num_chunks:
            return Failure(
                FailureKind.BAD_MESSAGE,
                f"protocol: piece {piece} of a room of {self.num_chunks} chunks",
            ), None
        slots = self.chunk_slots(chunk)
        planes = planes.layers(self.groups[group], self.groups[-1].stop)
        rows = mode.messages_per_piece(planes, len(slots))
        expected = planes.staging_bytes(len(slots), head_slice.num_heads) // rows
        chunks = 1
        if rows == 1 and nbytes != expected:  # perhaps this chunk and the ones after it
            chunks = self._chunks_in(chunk, nbytes, planes.staging_bytes(1, head_slice.num_heads))
            if chunks < 2:
                error = f"protocol: {nbytes} bytes for piece {piece} from rank {writer}, "
                error += f"expected {expected}"
                if self.max_message_bytes:
                    error += f" (or whole chunks from it on, up to {self.max_message_bytes})"
                return Failure(FailureKind.BAD_MESSAGE, error), None
            start = chunk * self.chunk_tokens
            slots = self.slots[start : min(start + chunks * self.chunk_tokens, self.num_tokens)]
        keys = tuple(((chunk + i) * len(self.groups) + group, writer) for i in range(chunks))
        index = max(self.taken.get(key, 0) for key in keys)
        if index >= rows:
            return Failure(
                FailureKind.BAD_MESSAGE,
                f"protocol: piece {piece} from prefill rank {writer} arrived twice",
            ), None
        piece_of = Piece(head_slice, slots, planes, index, chunk * self.chunk_tokens, keys)
        self.take(piece_of)
        return None, piece_of

    def _chunks_in(self, chunk: int, nbytes: int, token_bytes: int) -> int:
        """How many whole chunks from `chunk` on a message of `nbytes` carries (0: none fits:
        not whole tokens, not ending at a chunk's end, past the room or over the size the
        registration allowed)."""
        tokens, rest = divmod(nbytes, token_bytes)
        start = chunk * self.chunk_tokens
        end = start + tokens
        if rest or nbytes > self.max_message_bytes or not start < end <= self.num_tokens:
            return 0
        if end != self.num_tokens and end % self.chunk_tokens:
            return 0
        return -(-tokens // self.chunk_tokens)

    def untake(self, piece: Piece) -> None:
        """`piece` was checked but not taken after all (the ring is full): it stays queued."""
        for key in piece.keys:
            self.taken[key] -= 1

    def units(self, mode: StagedMode | SliceMode, num_planes: int) -> int:
        """Messages the room takes in all, from every writer."""
        return mode.messages_per_writer(self, num_planes) * len(self.writers)

    def complete(self, mode: StagedMode | SliceMode, num_planes: int) -> bool:
        """Every writer's every message is in the cache or its scatter queued (`kv_fence`),
        and every prefill rank is done."""
        units = self.units(mode, num_planes)
        return len(self.first_tokens) == len(self.rank_peers) > 0 and self.landed_units == units
