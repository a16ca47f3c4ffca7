"""A decode rank's TransferDone notes: each prefill rank's last message of a room, behind its
data on the same endpoint (tags.DONE_PIECE), a frame's bytes in host memory. Where the data
plane posts receives ahead, each note's receive is posted as its room registers, into a host
buffer of MAX_DONE_BYTES: the note is read in the turn its arrival wakes, with no probe and no
post on the way. Otherwise, or past NOTES_AHEAD such buffers, a note is taken in as it is
probed (it is small and nearly always in whole by then). Read once in, checked against the
room and the writer it came for, and handed to the agent."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from kvferry.transport.core import AgentCore
from kvferry.transport.dataplane import DataOp, failure
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.messages import TransferDone, WireError
from kvferry.transport.recv_room import RecvRoom
from kvferry.transport.tags import DONE_PIECE, MAX_DONE_BYTES, pack_tag

NOTES_AHEAD = 512  # notes' receives posted ahead at once, at most (a host buffer each)


class _Note:
    __slots__ = ("ahead", "buffer", "request", "room", "writer")

    def __init__(self, room: RecvRoom, writer: int, buffer, request: DataOp, ahead: bool) -> None:
        self.room, self.writer, self.buffer, self.request = room, writer, buffer, request
        self.ahead = ahead  # posted before its message came


class DoneNotes:
    def __init__(
        self,
        core: AgentCore,
        fail_room: Callable[[RecvRoom, Failure], None],
        on_done: Callable[[RecvRoom, TransferDone], None],
        touch: Callable[[int], None],
    ) -> None:
        self.core, self._fail_room, self._on_done, self._touch = core, fail_room, on_done, touch
        self._taking: deque[_Note] = deque()  # receives posted, oldest first
        self._ahead = 0  # of which posted ahead
        self._spare: list[torch.Tensor] = []  # buffers of notes posted ahead, read

    @property
    def busy(self) -> bool:
        """Whether a note is being taken in that the loop must look at soon: one posted ahead
        for an open room is not (its completion wakes the loop, see RecvPipeline.busy)."""
        return any(not note.ahead or not note.room.open for note in self._taking)

    def expect(self, room: RecvRoom) -> None:
        """As `room` registers: post the receive of each prefill rank's note ahead, while fewer
        than NOTES_AHEAD are; the rest come by probe."""
        for writer in sorted(room.rank_peers):
            if self._ahead >= NOTES_AHEAD:
                return
            spare = self._spare
            buffer = spare.pop() if spare else torch.empty(MAX_DONE_BYTES, dtype=torch.uint8)
            tag = pack_tag(room.key, DONE_PIECE, writer)
            request = self.core.data.expect(tag, buffer)
            if request is None:  # no record free: it comes by probe
                self._spare.append(buffer)
                return
            self._ahead += 1
            self._taking.append(_Note(room, writer, buffer, request, ahead=True))

    def cancel(self, room: RecvRoom) -> None:
        """`room` failed: cancel the receives of its notes posted ahead."""
        for note in self._taking:
            if note.room is room and note.ahead and not note.request.done():
                self.core.data.cancel(note.request)

    def take(self, room: RecvRoom, tag: int, nbytes: int, writer: int) -> DataOp | None:
        """Take in the note probed with `tag`; the discard of one refused (it fails its
        room), for its owner to see done."""
        if writer not in room.rank_peers or nbytes > MAX_DONE_BYTES:
            error = f"protocol: TransferDone of {nbytes} bytes from prefill rank {writer}"
            self._fail_room(room, Failure(FailureKind.BAD_MESSAGE, error))
            return self.core.data.discard(tag)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        request = self.core.data.recv_note(tag, buffer)
        self._taking.append(_Note(room, writer, buffer, request, ahead=False))
        return None

    def finish(self) -> None:
        """Read the notes whose receives are done."""
        for _ in range(len(self._taking)):
            note = self._taking.popleft()
            if not note.request.done():
                self._taking.append(note)
                continue
            self._finish(note)
            if note.ahead:  # read: its buffer can take another note
                self._ahead -= 1
                self._spare.append(note.buffer)

    def _finish(self, note: _Note) -> None:
        room, writer, request = note.room, note.writer, note.request
        error = request.error()
        if not room.open:
            return
        if error:
            self._fail_room(room, failure("receive", error))
            return
        buffer = note.buffer if request.length is None else note.buffer[: request.length]
        message = self._read(room, writer, buffer)
        if isinstance(message, str):
            error = f"protocol: TransferDone from prefill rank {writer}: {message}"
            self._fail_room(room, Failure(FailureKind.BAD_MESSAGE, error))
            return
        self.core.peers.heard(room.rank_peers[writer])
        self._on_done(room, message)
        self._touch(room.room)

    def _read(self, room: RecvRoom, writer: int, buffer: torch.Tensor) -> TransferDone | str:
        """The TransferDone in `buffer`, or why it is not one for this room from `writer`."""
        try:
            message = self.core.control.codec.decode(buffer.numpy().tobytes())
        except WireError as exc:
            return str(exc)
        if not isinstance(message, TransferDone):
            return f"a {type(message).__name__} instead"
        if (message.room, message.src_rank) != (room.room, writer):
            return f"it is for room {message.room:#x} from rank {message.src_rank}"
        return message
