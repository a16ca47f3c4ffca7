"""Decode role on one rank: reserves pages for each prompt, waits for its KV to arrive, then
decodes it in the running batch.

A request's life here: queued (waiting for pages) -> reserved (pages held, its receiver
registering with the prefill group; the daemon now sends the prompt to prefill) -> arriving ->
admitted to the running batch when every rank has its KV -> finished. A request that fails or
is aborted while its KV is arriving drains first: its pages are freed only once no rank's
transfer can still write into them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvferry.daemon.engine.group import TPGroup, Verdict
from kvferry.daemon.engine.outputs import Samples, StepOutput, TokenOutput
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import DecodeScheduler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.handles import KVReceiver
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.room import KVPoll

# a room another TP rank failed; that rank's transfer metrics count why
ELSEWHERE = Failure(FailureKind.OTHER_RANK, "KV transfer failed on another rank")


@dataclass
class _Request:
    room: int
    seq: Sequence
    bootstrap: str
    receiver: KVReceiver | None = None
    reserved_at: float = 0.0
    emitted: int = 0  # output tokens reported


class DecodeEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: DecodeScheduler,
        agent: DecodeAgent,
        eos_ids: frozenset[int] = frozenset(),
        group: TPGroup | None = None,
    ) -> None:
        self.runner, self.scheduler, self.agent, self.eos_ids = runner, scheduler, agent, eos_ids
        self.group = group or TPGroup()
        self.queued: deque[_Request] = deque()  # waiting for KV pages
        self.arriving: dict[int, _Request] = {}
        self.draining: dict[int, _Request] = {}  # failed; a rank may still be writing its pages
        self.running: dict[int, _Request] = {}  # by sequence id, admitted or in the batch
        self.outputs: list[TokenOutput] = []  # drained by the caller
        self.reserved: list[int] = []  # rooms whose pages are held; drained by the caller
        self.samples = Samples()  # drained by the caller
        self._in_flight = None  # the queued step whose tokens are not taken in yet
        # One rank alone (TP1) knows a room's first token is final as its KV lands: set, this
        # takes it then, on the transfer thread, instead of the next step's admission (the
        # worker sends it to the daemon at once; `_first_token_ready`); unused with several.
        self.report_first: Callable[[TokenOutput], None] | None = None

    @property
    def busy(self) -> bool:
        return bool(
            self.queued or self.arriving or self.draining or self.running or self._in_flight
        )

    def submit(
        self,
        room: int,
        prompt: list[int],
        params: SamplingParams,
        bootstrap: str,
        retry: bool = False,
    ) -> None:
        """Queue a request whose KV the prefill group behind `bootstrap` will send (a `retry`
        of one that failed elsewhere goes first: it has waited its turn once); ValueError
        when its prompt can never fit this rank's cache."""
        if room in self.arriving or any(r.room == room for r in self.queued):
            raise ValueError(f"room {room} is already in use")
        seq = Sequence(prompt, params, eos_ids=self.eos_ids)
        blocks = self.runner.blocks
        if blocks.pages_for(seq.num_prompt + 1) > blocks.num_pages:
            raise ValueError(
                f"a prompt of {seq.num_prompt} tokens exceeds the KV cache "
                f"({blocks.num_pages} pages of {blocks.page_size} tokens)"
            )
        request = _Request(room, seq, bootstrap)
        if retry:
            self.queued.appendleft(request)
        else:
            self.queued.append(request)

    def refuse(self, room: int, failure: Failure) -> None:
        """Report a submission that could not be taken."""
        self.outputs.append(TokenOutput(room, [], "error", failure))

    def live_rooms(self) -> list[int]:
        rooms = [r.room for r in self.queued] + list(self.arriving)
        return rooms + [r.room for r in self.running.values()]

    def queues(self) -> dict[str, int]:
        return {
            "waiting": len(self.queued),
            "arriving": len(self.arriving),
            "running": len(self.running),
        }

    def take_output(self) -> StepOutput:
        progress = StepOutput(outputs=self.outputs, reserved=self.reserved)
        self.outputs, self.reserved = [], []
        return progress

    def abort(self, room: int, failure: Failure) -> None:
        for request in self.queued:
            if request.room == room:
                self.queued.remove(request)
                self.outputs.append(TokenOutput(room, [], "abort", failure))
                return
        request = self.arriving.pop(room, None)
        if request is not None:
            request.receiver.abort(failure)
            self.draining[room] = request
            self.outputs.append(TokenOutput(room, [], "abort", failure))
            return
        for request in list(self.running.values()):
            if request.room == room:
                request.seq.finish("abort")
                self.outputs.append(TokenOutput(room, [], "abort", failure))
                if not request.seq.in_flight:  # else its pages go when its last token is in
                    self.scheduler.remove(request.seq)
                    self._release(request)
                return

    def step(self, before_forward: Callable[[], None] | None = None) -> bool:
        """Reserve, admit arrivals, drain, queue one decode step, then take in the tokens of
        the step before it (the device runs the new step meanwhile); False when no forward
        was queued. `before_forward` runs after the reservations and admissions, before the
        forward: the caller reports them (pages held, first tokens) a whole step sooner."""
        self._reserve()
        self._settle()
        if before_forward is not None:
            before_forward()
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            began = time.perf_counter()
            logits = self.runner.forward(batch, self._in_flight)
            launched = self.runner.sample_async(logits, batch)
            self.samples.forward_s.append(time.perf_counter() - began)
        if self._in_flight is not None:
            self._take(self._in_flight)
        self._in_flight = launched
        for seq in self.scheduler.dropped():  # finished without a forward (out of pages)
            request = self.running.pop(seq.id)
            self.outputs.append(TokenOutput(request.room, [], seq.finish_reason))
            self._forget(request)
        return bool(batch)

    def _take(self, future) -> None:
        tokens = future.result()
        self._fail_draws(future.errors)
        over = {seq.id for seq in self.scheduler.sampled(future.batch, tokens)}
        for work, token in zip(future.batch, tokens, strict=True):
            request = self.running.get(work.seq.id)
            if request is None or request.emitted == len(work.seq.output):
                continue  # aborted meanwhile, or a token sampled after its end
            request.emitted = len(work.seq.output)
            finish = work.seq.finish_reason if work.seq.finished else None
            self.outputs.append(TokenOutput(request.room, [token], finish))
        for seq_id in over:
            request = self.running.get(seq_id)
            if request is not None:
                self._forget(request)

    def _fail_draws(self, errors: dict[int, str]) -> None:
        """Sequences whose draw failed end with that error before their tokens are taken in:
        finished, their placeholder tokens are dropped, and their pages go once no step in
        flight uses them — the rest of the batch carries on."""
        for seq_id, error in errors.items():
            request = self.running.get(seq_id)
            if request is not None and not request.seq.finished:
                request.seq.finish("error")
                failure = Failure(FailureKind.INTERNAL, error)
                self.outputs.append(TokenOutput(request.room, [], "error", failure))

    def _reserve(self) -> None:
        """FIFO: the oldest queued request takes pages first, later ones wait behind it."""
        blocks = self.runner.blocks
        while self.queued:
            seq = self.queued[0].seq
            if not blocks.can_allocate(seq.id, seq.num_prompt + 1):
                break
            request = self.queued.popleft()
            blocks.allocate(seq.id, seq.num_prompt)
            slots = blocks.slots(seq.id, 0, seq.num_prompt)
            early = self._first_token_ready if self._reports_first else None
            request.receiver = self.agent.receiver(request.room, slots, request.bootstrap, early)
            request.reserved_at = time.monotonic()
            self.arriving[request.room] = request
            self.reserved.append(request.room)

    def _settle(self) -> None:
        """Agree with the other ranks on every arriving and draining room."""
        arriving, draining = list(self.arriving.values()), list(self.draining.values())
        states = [r.receiver.poll() for r in arriving]
        # a draining room is settled once its transfer is over on every rank
        states += [_settled(r.receiver.poll()) for r in draining]
        verdicts = self.group.verdicts(states)
        for request, verdict in zip(arriving, verdicts, strict=False):
            if verdict is Verdict.SUCCESS:
                del self.arriving[request.room]
                self.samples.transfer_s.append(time.monotonic() - request.reserved_at)
                self._admit(request)
            elif verdict is Verdict.FAILED:
                del self.arriving[request.room]
                failure = request.receiver.failure or ELSEWHERE
                request.receiver.abort(failure)
                self.draining[request.room] = request
                told = Failure(failure.kind, f"transfer failed: {failure.detail}")
                untouched = not request.receiver.kv_arrived
                self.outputs.append(TokenOutput(request.room, [], "error", told, None, untouched))
        for request, verdict in zip(draining, verdicts[len(arriving) :], strict=True):
            if verdict is Verdict.SUCCESS:
                del self.draining[request.room]
                self._release(request)

    @property
    def _reports_first(self) -> bool:
        return self.report_first is not None and self.group.size == 1

    def _first_token_ready(self, receiver: KVReceiver) -> None:
        """On the transfer thread, as `receiver`'s room succeeds: its first token goes out now
        rather than with the admission a step boundary later (at c=32 half a step, ~1 ms).
        Its sequence takes the token at the admission, which then reports only a finish."""
        marks = dict(receiver.marks)
        self.report_first(TokenOutput(receiver.room, [receiver.first_token], marks=marks))
        receiver.first_token_reported = True  # after the send: else the admission reports it

    def _admit(self, request: _Request) -> None:
        # the KV's last scatter may still be queued: every later forward runs after it
        receiver = request.receiver
        receiver.order_kv()
        seq = request.seq
        self.running[seq.id] = request
        seq.append(receiver.first_token)
        request.emitted = 1
        finish = seq.finish_reason if seq.finished else None
        if receiver.first_token_reported:
            if finish is not None:
                self.outputs.append(TokenOutput(request.room, [], finish))
        else:
            marks = {**receiver.marks, "admitted": time.time()}
            first_token = [receiver.first_token]
            self.outputs.append(TokenOutput(request.room, first_token, finish, marks=marks))
        if seq.finished:
            self._release(request)
        else:
            self.scheduler.admit(seq)

    def _release(self, request: _Request) -> None:
        self.runner.blocks.deallocate(request.seq.id)
        self._forget(request)

    def _forget(self, request: _Request) -> None:
        self.running.pop(request.seq.id, None)
        self.runner.sampler.forget(request.seq.id)


def _settled(state: KVPoll) -> KVPoll:
    """Success once a draining room's transfer is over here, however it ended."""
    return KVPoll.Success if state in (KVPoll.Success, KVPoll.Failed) else KVPoll.Transferring
