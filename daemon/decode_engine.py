"""Decode role on one rank: reserves pages for each prompt, waits for its KV to arrive, then
decodes it in the running batch."""

from __future__ import annotations

from kvferry.daemon.runner import ModelRunner
from kvferry.daemon.scheduler import DecodeScheduler
from kvferry.daemon.sequence import SamplingParams, Sequence
from kvferry.transport.handles import KVReceiver
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.room import KVPoll


class DecodeEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: DecodeScheduler,
        agent: DecodeAgent,
        eos_id: int | None = None,
    ) -> None:
        self.runner, self.scheduler, self.agent, self.eos_id = runner, scheduler, agent, eos_id
        self.arriving: dict[int, tuple[Sequence, KVReceiver]] = {}
        self.finished: list[Sequence] = []

    def submit(
        self, prompt: list[int], params: SamplingParams, room: int, bootstrap: str
    ) -> Sequence:
        """Reserve the prompt's pages and ask the prefill group behind `bootstrap` for its KV."""
        seq = Sequence(prompt, params, eos_id=self.eos_id)
        blocks = self.runner.blocks
        if not blocks.can_allocate(seq.id, seq.num_prompt + 1):
            raise MemoryError(
                f"no KV pages for a prompt of {seq.num_prompt} tokens "
                f"({blocks.free_pages} of {blocks.num_pages} pages free)"
            )
        blocks.allocate(seq.id, seq.num_prompt)
        receiver = self.agent.receiver(room, blocks.slots(seq.id, 0, seq.num_prompt), bootstrap)
        self.arriving[seq.id] = (seq, receiver)
        return seq

    def step(self) -> bool:
        """Admit arrived requests, then one decode step; False when there was nothing to do."""
        self._admit_arrivals()
        batch = self.scheduler.schedule()
        if not batch:
            return bool(self.arriving)
        logits = self.runner.forward(batch)
        tokens = self.runner.sample(logits, [w.seq for w in batch])
        for seq in self.scheduler.sampled(batch, tokens):
            self._done(seq)
        return True

    def _admit_arrivals(self) -> None:
        for seq_id, (seq, receiver) in list(self.arriving.items()):
            state = receiver.poll()
            if state == KVPoll.Success:
                del self.arriving[seq_id]
                seq.append(receiver.first_token)
                if seq.finished:
                    self.runner.blocks.deallocate(seq.id)
                    self._done(seq)
                else:
                    self.scheduler.admit(seq)
            elif state == KVPoll.Failed:
                del self.arriving[seq_id]
                seq.finish(f"transfer failed: {receiver.failure_reason}")
                self.runner.blocks.deallocate(seq.id)  # Failed: nothing writes into its pages now
                self._done(seq)

    def _done(self, seq: Sequence) -> None:
        self.runner.sampler.forget(seq.id)
        self.finished.append(seq)
