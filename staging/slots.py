"""Token slots of a paged KV cache: slot = page * page_size + offset within the page."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_slots(
    pages: Sequence[int] | np.ndarray, page_size: int, start: int, count: int
) -> np.ndarray:
    """Cache slots (int64) of tokens [start, start + count) of a sequence stored in `pages`."""
    if page_size < 1 or start < 0 or count < 0:
        raise ValueError(
            f"page_size={page_size}, start={start}, count={count}: need page_size >= 1 "
            "and non-negative start and count"
        )
    page_ids = np.asarray(pages, dtype=np.int64)
    positions = np.arange(start, start + count, dtype=np.int64)
    if count and (start + count - 1) // page_size >= len(page_ids):
        raise ValueError(
            f"tokens up to {start + count} need {-(-(start + count) // page_size)} pages of "
            f"{page_size}, the sequence has {len(page_ids)}"
        )
    return page_ids[positions // page_size] * page_size + positions % page_size
