"""UCX tags of data messages: [recv key: 40 bits][piece: 16 bits][writer rank: 8 bits].

A piece is one message's share of a room: chunk * layer groups + group (just the chunk in
whole-chunk mode). The receive key is chosen by the decode rank per room, so tags only need to
be unique within one decode rank's worker.
"""

from __future__ import annotations

KEY_BITS, PIECE_BITS, WRITER_BITS = 40, 16, 8
MAX_KEY = (1 << KEY_BITS) - 1
MAX_PIECES = 1 << PIECE_BITS
MAX_WRITERS = 1 << WRITER_BITS


def pack_tag(key: int, piece: int, writer: int) -> int:
    if not (0 <= key <= MAX_KEY and 0 <= piece < MAX_PIECES and 0 <= writer < MAX_WRITERS):
        raise ValueError(f"tag fields out of range: key={key} piece={piece} writer={writer}")
    return (key << (PIECE_BITS + WRITER_BITS)) | (piece << WRITER_BITS) | writer


def unpack_tag(tag: int) -> tuple[int, int, int]:
    """(key, piece, writer) of a tag."""
    return (
        tag >> (PIECE_BITS + WRITER_BITS),
        (tag >> WRITER_BITS) & (MAX_PIECES - 1),
        tag & (MAX_WRITERS - 1),
    )
