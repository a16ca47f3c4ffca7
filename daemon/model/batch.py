"""What one forward computes, as tensors on the model's device: the new tokens of every
sequence and where each sequence's context lives in the paged cache.

A sequence's context is `lengths[s]` tokens, its last `starts[s+1] - starts[s]` the new ones;
token `t` of it is in slot `table[s, t // page_size] * page_size + t % page_size`. Tests and the
reference decoder pass slot lists as a table of one-slot pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [T] token ids, every sequence's new tokens in order
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] cache slots the new tokens' K/V go to
    last: torch.Tensor  # [S] index in T of each sequence's last token (its logits are returned)
    table: torch.Tensor  # [S, W] int32 pages of each context, in token order
    lengths: torch.Tensor  # [S] int32 contexts, new tokens included
    starts: torch.Tensor  # [S + 1] int32 offsets of each sequence's new tokens in T
    page_size: int
    max_new: int  # the most new tokens of one sequence (1: a decode batch)

    @property
    def decode(self) -> bool:
        return self.max_new == 1

    @classmethod
    def decode_step(
        cls, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, page_size: int
    ) -> Batch:
        """One new token per sequence, everything else derived on the device (nothing here
        reads a value back, so a CUDA graph can capture it)."""
        rows = torch.arange(len(tokens), device=tokens.device)
        pages = table[rows, positions // page_size].to(positions.dtype)
        return cls(
            tokens=tokens,
            positions=positions,
            slots=pages * page_size + positions % page_size,
            last=rows,
            table=table,
            lengths=(positions + 1).to(torch.int32),
            starts=torch.arange(len(tokens) + 1, device=tokens.device, dtype=torch.int32),
            page_size=page_size,
            max_new=1,
        )
