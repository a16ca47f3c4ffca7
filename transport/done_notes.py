"""A decode rank's TransferDone notes: each prefill rank's last message of a room, behind its
data on the same endpoint (tags.DONE_PIECE), a frame's bytes in host memory. Taken in as it is
probed (it is small and nearly always in whole by then), read once in, checked against the
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
from kvferry.transport.tags import MAX_DONE_BYTES


class DoneNotes:
    def __init__(
        self,
        core: AgentCore,
        fail_room: Callable[[RecvRoom, Failure], None],
        on_done: Callable[[RecvRoom, TransferDone], None],
        touch: Callable[[int], None],
    ) -> None:
        self.core, self._fail_room, self._on_done, self._touch = core, fail_room, on_done, touch
        self._taking: deque = deque()  # (room, writer, buffer, request), receives posted

    def __bool__(self) -> bool:
        """Whether a note is being taken in."""
        return bool(self._taking)

    def take(self, room: RecvRoom, tag: int, nbytes: int, writer: int) -> DataOp | None:
        """Take in the note probed with `tag`; the discard of one refused (it fails its
        room), for its owner to see done."""
        if writer not in room.rank_peers or nbytes > MAX_DONE_BYTES:
            error = f"protocol: TransferDone of {nbytes} bytes from prefill rank {writer}"
            self._fail_room(room, Failure(FailureKind.BAD_MESSAGE, error))
            return self.core.data.discard(tag)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._taking.append((room, writer, buffer, self.core.data.recv_note(tag, buffer)))
        return None

    def finish(self) -> None:
        """Read the notes whose receives are done."""
        for _ in range(len(self._taking)):
            room, writer, buffer, request = entry = self._taking.popleft()
            if not request.done():
                self._taking.append(entry)
                continue
            error = request.error()
            if not room.open:
                continue
            if error:
                self._fail_room(room, failure("receive", error))
                continue
            message = self._read(room, writer, buffer)
            if isinstance(message, str):
                error = f"protocol: TransferDone from prefill rank {writer}: {message}"
                self._fail_room(room, Failure(FailureKind.BAD_MESSAGE, error))
                continue
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
