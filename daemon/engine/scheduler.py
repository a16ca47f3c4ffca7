"""Schedulers: which tokens of which sequences the next forward computes.

`PrefillScheduler` runs chunked prefill under a token budget; `DecodeScheduler` batches one
token per running sequence. They share the Sequence and BlockManager, never torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.sequence import SeqStatus, Sequence


@dataclass
class Work:
    """Tokens [start, start + count) of `seq` go through the next forward."""

    seq: Sequence
    start: int
    count: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.count >= self.seq.num_prompt


class PrefillScheduler:
    """FIFO chunked prefill: each step fills up to `max_batch_tokens`, at most
    `prefill_chunk_tokens` per sequence; a sequence's pages for its whole prompt are taken when
    it first runs."""

    def __init__(
        self, blocks: BlockManager, prefill_chunk_tokens: int, max_batch_tokens: int
    ) -> None:
        if prefill_chunk_tokens < 1 or max_batch_tokens < 1:
            raise ValueError(
                f"prefill_chunk_tokens={prefill_chunk_tokens}, "
                f"max_batch_tokens={max_batch_tokens} must be >= 1"
            )
        self.blocks, self.prefill_chunk_tokens, self.max_batch_tokens = (
            blocks,
            prefill_chunk_tokens,
            max_batch_tokens,
        )
        self.waiting: deque[Sequence] = deque()

    def check(self, seq: Sequence) -> None:
        """ValueError when `seq` could never be scheduled (its prompt exceeds the cache)."""
        if self.blocks.pages_for(seq.num_prompt) > self.blocks.num_pages:
            raise ValueError(
                f"a prompt of {seq.num_prompt} tokens exceeds the KV cache "
                f"({self.blocks.num_pages} pages of {self.blocks.page_size})"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        self.waiting.append(seq)

    def schedule(self) -> list[Work]:
        budget, batch = self.max_batch_tokens, []
        for seq in self.waiting:
            if budget == 0:
                break
            if seq.status is SeqStatus.WAITING:
                if not self.blocks.can_allocate(seq.id, seq.num_prompt):
                    break  # FIFO: later prompts wait behind it rather than starve it
                self.blocks.allocate(seq.id, seq.num_prompt)
                seq.status = SeqStatus.RUNNING
            count = min(seq.prompt_left, self.prefill_chunk_tokens, budget)
            batch.append(Work(seq, seq.num_computed, count))
            budget -= count
        return batch

    def computed(self, batch: list[Work]) -> list[Sequence]:
        """Record a finished forward; returns the sequences whose whole prompt is now computed."""
        done = []
        for work in batch:
            work.seq.num_computed += work.count
            if work.seq.prompt_left == 0:
                done.append(work.seq)
        for seq in done:
            self.waiting.remove(seq)
        return done

    def remove(self, seq: Sequence) -> None:
        """Stop computing `seq` (its room failed); its pages are the caller's to free."""
        if seq in self.waiting:
            self.waiting.remove(seq)


class DecodeScheduler:
    """Every running sequence decodes one token per step; admitted ones join the next step."""

    def __init__(self, blocks: BlockManager, max_running: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running={max_running} must be >= 1")
        self.blocks, self.max_running = blocks, max_running
        self.running: list[Sequence] = []
        self.ready: deque[Sequence] = deque()  # KV received, waiting for a batch slot
        self._dropped: list[Sequence] = []  # finished by schedule() for want of pages

    def admit(self, seq: Sequence) -> None:
        """A sequence whose prompt KV (and first token) has arrived."""
        seq.num_computed = seq.num_prompt
        self.ready.append(seq)

    def schedule(self) -> list[Work]:
        while self.ready and len(self.running) < self.max_running:
            seq = self.ready.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        batch = []
        for seq in list(self.running):
            if seq.finished or seq.generated >= seq.params.max_tokens:
                continue  # over, or its last token is in flight: nothing more to compute
            if not self.blocks.can_allocate(seq.id, seq.num_tokens):
                if seq.in_flight:
                    continue  # its pages are still in use; see once its token is back
                seq.finish("out of KV pages")
                self._drop(seq)
                continue
            self.blocks.allocate(seq.id, seq.num_tokens)
            batch.append(Work(seq, seq.num_tokens - 1, 1))
            seq.in_flight += 1  # the token this step samples
        return batch

    def sampled(self, batch: list[Work], tokens: list[int]) -> list[Sequence]:
        """Record the tokens a finished step sampled (one step after it was scheduled: later
        steps may already be running). Returns the sequences that are over and whose pages
        nothing in flight uses any more; their pages are released."""
        over = []
        for work, token in zip(batch, tokens, strict=True):
            seq = work.seq
            seq.in_flight -= 1
            if not seq.finished:  # a token sampled after the end (EOS seen late) is dropped
                seq.num_computed = seq.num_tokens - seq.in_flight - 1
                seq.append(token)
            if seq.finished and seq.in_flight == 0 and seq in self.running:
                over.append(seq)
        for seq in over:
            self.running.remove(seq)
            self.blocks.deallocate(seq.id)
        return over

    def dropped(self) -> list[Sequence]:
        """Sequences the last schedule() finished without a forward (pages released)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out (aborted); its pages are the caller's to free."""
        if seq in self.ready:
            self.ready.remove(seq)
        if seq in self.running:
            self.running.remove(seq)

    def _drop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.deallocate(seq.id)
        self._dropped.append(seq)
