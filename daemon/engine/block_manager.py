"""KV page allocation for one rank's paged cache. Plain Python: no torch here."""

from __future__ import annotations

from collections import deque

import numpy as np


class BlockManager:
    """`num_pages` pages of `page_size` token slots; a sequence holds whole pages, in order."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self._free: deque[int] = deque(range(num_pages))
        self._owned: dict[int, list[int]] = {}  # sequence id -> its pages, in token order
        self._tables: dict[int, np.ndarray] = {}  # the same as int32 arrays, built on demand

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to `num_tokens` tokens now."""
        held = len(self._owned.get(seq_id, ()))
        return self.pages_for(num_tokens) - held <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow the sequence's pages to cover `num_tokens`; returns all its pages."""
        pages = self._owned.setdefault(seq_id, [])
        need = self.pages_for(num_tokens) - len(pages)
        if need > len(self._free):
            raise MemoryError(
                f"sequence {seq_id} needs {need} more pages, {len(self._free)} are free"
            )
        if need > 0:
            pages.extend(self._free.popleft() for _ in range(need))
            self._tables.pop(seq_id, None)
        return pages

    def deallocate(self, seq_id: int) -> None:
        """Give back every page of the sequence (unknown ids are ignored: freeing is idempotent)."""
        self._free.extend(self._owned.pop(seq_id, ()))
        self._tables.pop(seq_id, None)

    def table(self, seq_id: int) -> np.ndarray:
        """The sequence's pages as int32, in token order (a forward's page-table row); rebuilt
        only when the sequence gains pages, every page_size tokens."""
        table = self._tables.get(seq_id)
        if table is None:
            table = self._tables[seq_id] = np.array(self._owned.get(seq_id, ()), dtype=np.int32)
        return table

    def slots(self, seq_id: int, start: int, count: int) -> np.ndarray:
        """Cache slots of tokens [start, start + count) of the sequence."""
        # deferred: importing kvferry.staging loads torch, which this module keeps out
        from kvferry.staging.slots import token_slots

        return token_slots(self._owned.get(seq_id, []), self.page_size, start, count)

    def check(self) -> None:
        """Every page is free or owned by exactly one sequence."""
        owned = [p for pages in self._owned.values() for p in pages]
        assert sorted(owned + list(self._free)) == list(range(self.num_pages))
