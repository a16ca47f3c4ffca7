"""How KV is packed into data messages: the staged mode, and the contract every mode keeps.

Staged (the real path): one bulk message per piece (a chunk's layers, or one layer group of
them) and destination. Prefill gathers the destination's head slice of every plane of the
piece into a region of the staging ring and sends the region; decode receives it into a
region of its own ring and scatters it into the paged cache. The pipelines
(`send_pipeline.py`, `recv_pipeline.py`) move items through a mode's steps and own the
rest: queues, timeouts, counters, failures. `transfer.mode: slice`, the per-token comparison
path, keeps the same contract in `slice_mode.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.copy_stream import CopyStream
from kvferry.staging.kv_copy import KVPlanes
from kvferry.transport.config import TransferConfig
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.recv_room import Arrival, RecvRoom
from kvferry.transport.send_room import Outgoing

# Gathers queued in one turn behind the same fence finish together, in stream order: one wake
# of the loop after the last of them serves them all (a turn costs tens of µs of host time, a
# small gather a few µs of device time). Past this many bytes without a wake the loop is woken
# anyway, so that the first sends of a large batch start while the rest is gathered.
COALESCE_BYTES = 16 << 20


class StagedMode:
    chains = True  # its scatter can be launched by the data plane's receive completion

    def __init__(self, staging: StagingBuffer, copies: CopyStream) -> None:
        self.staging, self.copies = staging, copies
        # gathers queued since the loop's last wake was asked for: the fence they wait on, bytes
        self._unwoken: tuple[object, int] | None = None

    # --- prefill -------------------------------------------------------------------------------

    def stage(self, item: Outgoing) -> bool:
        """Start what must happen before `item` can be sent; False (nothing started) when it
        must wait for ring room. The pipeline sends once `item.fence` has fired."""
        nbytes = item.planes.staging_bytes(len(item.slots), item.dest.slice.num_heads)
        offset = self.staging.alloc(nbytes)
        if offset is None:
            return False
        item.offset, item.region = offset, self.staging.region(offset, nbytes)
        s, after = item.dest.slice, item.fence
        if self._unwoken is not None and self._unwoken[0] is not after:
            self.wake()  # the gathers before wait for an earlier fence: they finish first
        item.fence = self.copies.gather(
            item.planes, item.slots, s.src_head_start, s.num_heads, item.region, after=after,
            wake=False,
        )  # fmt: skip
        unwoken = nbytes + (self._unwoken[1] if self._unwoken is not None else 0)
        self._unwoken = (after, unwoken)
        if unwoken >= COALESCE_BYTES:
            self.wake()
        return True

    def wake(self) -> None:
        """Wake the loop once the gathers staged since the last wake have finished (the send
        pipeline calls this at the end of each staging pass)."""
        if self._unwoken is not None:
            self._unwoken = None
            self.copies.wake_when_done()

    def payloads(self, item: Outgoing) -> Iterator:
        """The buffers to send for `item`, in order: its ring region."""
        yield item.region

    # --- decode --------------------------------------------------------------------------------

    def messages_per_piece(self, planes: KVPlanes, num_tokens: int) -> int:
        return 1

    def max_message_bytes(self, config: TransferConfig) -> int:
        """The largest message this rank takes (several chunks that were ready together)."""
        return config.max_message_bytes

    def messages_per_writer(self, room: RecvRoom, num_planes: int) -> int:
        """Messages each writer sends a room in all."""
        return room.num_chunks * len(room.groups)

    def land(self, arrival: Arrival, nbytes: int) -> bool:
        """Where an arriving message goes (`arrival.region`); False when the ring is full."""
        offset = self.staging.alloc(nbytes)
        if offset is None:
            return False
        arrival.offset, arrival.region = offset, self.staging.region(offset, nbytes)
        return True

    def prepare(self, room: RecvRoom, planes: KVPlanes) -> None:
        """Check and upload the room's slots for the scatters its receives launch (`chain`):
        done as the room registers, long before its first message, whose hop it would
        otherwise lengthen. Each message's scatter reads its chunk of them."""
        if room.device_slots is None:
            planes.check_slice(room.slots, 0, planes.num_heads)
            slots = self.copies.upload_slots(room.slots)
            room.device_slots = (slots, slots.data_ptr())

    def chain(self, arrival: Arrival, launch) -> None:
        """Write the arrival's scatter into `launch`, the record of its native receive, whose
        completion then launches it (`DataPlane.chains_copies`), reading the room's slots
        (`prepare`)."""
        piece, room = arrival.piece, arrival.room
        self.prepare(room, piece.planes)
        s = piece.slice
        # the heads only: the slots were checked with the room's
        piece.planes.check_slice(piece.slots[:0], s.dst_head_start, s.num_heads)
        slots, address = room.device_slots
        arrival.chained = self.copies.chain_scatter(
            launch,
            arrival.region,
            piece.planes,
            address + slots.element_size() * piece.first,
            len(piece.slots),
            s.dst_head_start,
            s.num_heads,
        )

    def received(self, arrival: Arrival, last: bool):
        """A message is in: the fence after which its KV is in the cache (None: already).
        `last`: the room's last message, whose fence follows every copy queued so far (the
        room's `kv_fence`). No fence wakes the loop: the engine orders its own stream after
        `kv_fence`, and the receive pipeline takes finished scatters (and their ring
        regions) back in its next turn, whatever woke it."""
        if arrival.chained is not None:
            chained, arrival.chained = arrival.chained, None
            launched = arrival.request.launched
            return self.copies.chained_done(chained, launched, last=last, wake=False)
        piece = arrival.piece
        s = piece.slice
        return self.copies.scatter(
            arrival.region, piece.planes, piece.slots, s.dst_head_start, s.num_heads, wake=False
        )

    def abandon(self, arrival: Arrival):
        """A message that will not land (its receive failed or its room closed): the fence of a
        scatter its receive launched all the same, which must run before its ring region is
        reused (it wakes the loop when done); None if none was."""
        chained, arrival.chained = arrival.chained, None
        if chained is None:
            return None
        launched = getattr(arrival.request, "launched", False)  # None yet: never posted
        return self.copies.chained_done(chained, launched, last=True)

    def ring_too_small(self, need: int, config: TransferConfig) -> Failure | None:
        """Why a room whose largest message is `need` bytes can never be staged, or None."""
        if need <= config.ring_bytes:
            return None
        small = f"ring too small: a chunk needs {need} bytes, "
        return Failure(FailureKind.INCOMPATIBLE, small + f"the ring holds {config.ring_bytes}")
