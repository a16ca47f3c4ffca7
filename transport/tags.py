"""UCX tags of data messages: [recv key: 40 bits][chunk: 16 bits][writer rank: 8 bits].

The receive key is chosen by the decode rank per room, so tags only need to be unique within
one decode rank's worker.
"""

from __future__ import annotations

KEY_BITS, CHUNK_BITS, WRITER_BITS = 40, 16, 8
MAX_KEY = (1 << KEY_BITS) - 1
MAX_CHUNKS = 1 << CHUNK_BITS
MAX_WRITERS = 1 << WRITER_BITS


def pack_tag(key: int, chunk: int, writer: int) -> int:
    if not (0 <= key <= MAX_KEY and 0 <= chunk < MAX_CHUNKS and 0 <= writer < MAX_WRITERS):
        raise ValueError(f"tag fields out of range: key={key} chunk={chunk} writer={writer}")
    return (key << (CHUNK_BITS + WRITER_BITS)) | (chunk << WRITER_BITS) | writer


def unpack_tag(tag: int) -> tuple[int, int, int]:
    """(key, chunk, writer) of a tag."""
    return (
        tag >> (CHUNK_BITS + WRITER_BITS),
        (tag >> WRITER_BITS) & (MAX_CHUNKS - 1),
        tag & (MAX_WRITERS - 1),
    )
