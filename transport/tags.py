"""UCX tags of data messages: [recv key: 40 bits][piece: 16 bits][writer rank: 8 bits].

A piece is one message's share of a room: chunk * layer groups + group (just the chunk in
whole-chunk mode). The receive key is chosen by the decode rank per room, so tags only need to
be unique within one decode rank's worker.

The last piece value, DONE_PIECE, is not KV: it is a writer's `TransferDone` for the room (a
control message, encoded as a frame is, in host memory), sent behind its data on the same
endpoint, so that the decode rank reads it in the turn that takes the data's last message.
"""

from __future__ import annotations

KEY_BITS, PIECE_BITS, WRITER_BITS = 40, 16, 8
MAX_KEY = (1 << KEY_BITS) - 1
DONE_PIECE = (1 << PIECE_BITS) - 1
MAX_PIECES = DONE_PIECE  # KV messages per writer and room
MAX_WRITERS = 1 << WRITER_BITS
MAX_DONE_BYTES = 1 << 12  # a TransferDone with its timeline marks is a few hundred bytes


def pack_tag(key: int, piece: int, writer: int) -> int:
    if not (0 <= key <= MAX_KEY and 0 <= piece <= DONE_PIECE and 0 <= writer < MAX_WRITERS):
        raise ValueError(f"tag fields out of range: key={key} piece={piece} writer={writer}")
    return (key << (PIECE_BITS + WRITER_BITS)) | (piece << WRITER_BITS) | writer


def unpack_tag(tag: int) -> tuple[int, int, int]:
    """(key, piece, writer) of a tag."""
    return (
        tag >> (PIECE_BITS + WRITER_BITS),
        (tag >> WRITER_BITS) & DONE_PIECE,
        tag & (MAX_WRITERS - 1),
    )
