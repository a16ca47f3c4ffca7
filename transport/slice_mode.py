"""Slice mode (`transfer.mode: slice`): the per-token comparison path. One message per
(plane, token) of a piece and destination, sent straight from the prefill cache row and
received straight into the decode cache row: no staging ring, no gather or scatter. It keeps
the contract of `staged_mode.StagedMode`, so the pipelines do not know which mode runs.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvferry.staging.kv_copy import KVPlanes
from kvferry.transport.config import TransferConfig
from kvferry.transport.failure import Failure
from kvferry.transport.recv_room import Arrival, RecvRoom
from kvferry.transport.send_room import Outgoing


class SliceMode:
    chains = False  # nothing to launch after a receive

    # --- prefill -------------------------------------------------------------------------------

    def stage(self, item: Outgoing) -> bool:
        """Nothing to stage: the rows are sent once the forward's fence has fired."""
        return True

    def wake(self) -> None:
        """Nothing staged, nothing to wake for."""

    def payloads(self, item: Outgoing) -> Iterator:
        """One row per (plane, token), in that order, straight from the cache."""
        s = item.dest.slice
        slots = item.slots.tolist()
        for plane in item.planes.planes:
            heads = plane.narrow(1, s.src_head_start, s.num_heads)  # [slots, h, D]
            for slot in slots:
                yield heads[slot]

    # --- decode --------------------------------------------------------------------------------

    def messages_per_piece(self, planes: KVPlanes, num_tokens: int) -> int:
        return planes.num_planes * num_tokens

    def max_message_bytes(self, config: TransferConfig) -> int:
        return 0  # one row per message, always

    def messages_per_writer(self, room: RecvRoom, num_planes: int) -> int:
        """Messages each writer sends a room in all."""
        return room.num_tokens * num_planes  # one group: slice mode sends whole rows

    def land(self, arrival: Arrival, nbytes: int) -> bool:
        """Straight into the cache row: row `index` of a piece is plane index // tokens,
        token index % tokens."""
        piece = arrival.piece
        tokens = len(piece.slots)
        plane = piece.planes.planes[piece.index // tokens]
        row = plane[int(piece.slots[piece.index % tokens])]
        arrival.region = row.narrow(0, piece.slice.dst_head_start, piece.slice.num_heads)
        return True

    def received(self, arrival: Arrival, last: bool):
        return None  # the row is in place already

    def abandon(self, arrival: Arrival):
        return None  # nothing was launched for it

    def ring_too_small(self, need: int, config: TransferConfig) -> Failure | None:
        return None  # no ring
