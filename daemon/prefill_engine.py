"""Prefill role on one rank: chunked prefill, each chunk's KV handed to its room's KVSender as
soon as the forward that wrote it is queued; the first token travels with the last chunk."""

from __future__ import annotations

import torch

from kvferry.daemon.runner import ModelRunner
from kvferry.daemon.scheduler import PrefillScheduler
from kvferry.daemon.sequence import SamplingParams, Sequence
from kvferry.transport.handles import KVSender
from kvferry.transport.room import KVPoll
from kvferry.transport.sender import PrefillAgent


class PrefillEngine:
    def __init__(
        self, runner: ModelRunner, scheduler: PrefillScheduler, agent: PrefillAgent
    ) -> None:
        self.runner, self.scheduler, self.agent = runner, scheduler, agent
        self.senders: dict[int, tuple[Sequence, KVSender]] = {}  # seq id -> its room's sender
        self.handing_over: list[int] = []  # prompts computed, KV still leaving

    def submit(self, prompt: list[int], params: SamplingParams, room: int) -> Sequence:
        seq = Sequence(prompt, params)
        self.scheduler.add(seq)
        self.senders[seq.id] = (seq, self.agent.sender(room, len(prompt)))
        return seq

    def step(self) -> bool:
        """One forward over the scheduled chunks; False when there was nothing to do."""
        self._release_handed_over()
        batch = self.scheduler.schedule()
        if not batch:
            return bool(self.handing_over)
        logits = self.runner.forward(batch)
        ready = _forward_event(self.runner.kv.device)
        firsts = self._first_tokens(batch, logits)
        for work in batch:
            _, sender = self.senders[work.seq.id]
            slots = self.runner.blocks.slots(work.seq.id, work.start, work.count)
            if sender.poll() != KVPoll.Failed:
                sender.add_tokens(
                    slots, ready, first_token=firsts.get(work.seq.id), last=work.completes_prompt
                )
        for seq in self.scheduler.computed(batch):
            seq.append(firsts[seq.id])
            seq.finish("prefilled")
            self.handing_over.append(seq.id)
        return True

    def _first_tokens(self, batch, logits) -> dict[int, int]:
        """Sampled first tokens of the sequences whose prompt this batch completes."""
        rows = [i for i, work in enumerate(batch) if work.completes_prompt]
        if not rows:
            return {}
        tokens = self.runner.sample(logits[rows], [batch[i].seq for i in rows])
        return {batch[i].seq.id: token for i, token in zip(rows, tokens, strict=True)}

    def _release_handed_over(self) -> None:
        """Pages of a prompt are freed once its KV has left (or its room failed)."""
        for seq_id in list(self.handing_over):
            _, sender = self.senders[seq_id]
            if sender.poll() in (KVPoll.Success, KVPoll.Failed):
                self.handing_over.remove(seq_id)
                del self.senders[seq_id]
                self.runner.blocks.deallocate(seq_id)
                self.runner.sampler.forget(seq_id)


def _forward_event(device: torch.device) -> torch.cuda.Event | None:
    """Marks the end of the queued forward on the compute stream (None on a CPU: it is done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
