"""Prefill role on one rank: chunked prefill, each chunk's KV handed to its room's KVSender as
soon as the forward that wrote it is queued — with an event every `transfer.layer_group` layers,
so layer-wise messages leave while later layers compute; the first token travels with the last
chunk.

A prompt is known to be wanted by the decode side once a decode rank has registered its room
with every prefill rank (the ranks agree on it in `TPGroup.verdicts`). A decode daemon
registers a room as it submits the prompt, so the two race; waiting for the registration would
put its trip and a step boundary before every forward. Instead prompts start computing at once,
while the prompt tokens of rooms not registered yet stay within `unregistered_tokens` (their
KV waits in the pages until the registration says where it goes); a prompt past that budget is
held — no forward, no KV pages — until its room is registered. A room nobody registers fails at
the transfer's bootstrap timeout: a stranger's prompts cost at most that budget of pages and
forward tokens for that long, never the registered prompts' place in the queue beyond it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvferry.daemon.engine.group import TPGroup, Verdict
from kvferry.daemon.engine.outputs import RoomDone, Samples, StepOutput
from kvferry.daemon.engine.runner import DRAW_FAILED, ModelRunner
from kvferry.daemon.engine.scheduler import PrefillScheduler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.staging.layout import layer_groups
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.handles import KVSender, KVWritten
from kvferry.transport.room import TransferFailed
from kvferry.transport.sender import PrefillAgent

# a room another TP rank failed; that rank's transfer metrics count why
ELSEWHERE = Failure(FailureKind.OTHER_RANK, "transfer failed on another prefill rank")


@dataclass
class _Room:
    seq: Sequence
    sender: KVSender
    admitted: bool = False  # in the scheduler (registered, or within the unregistered budget)
    registered: bool = False  # registered on every rank (a verdict past BOOTSTRAPPING)
    computed_at: float | None = None  # when the prompt's last chunk was queued


class PrefillEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: PrefillScheduler,
        agent: PrefillAgent,
        group: TPGroup | None = None,
        unregistered_tokens: int = 0,
    ) -> None:
        """`unregistered_tokens`: prompt tokens of rooms not registered yet that may compute
        meanwhile (0: every prompt waits for its room's registration)."""
        if unregistered_tokens < 0:
            raise ValueError(f"unregistered_tokens={unregistered_tokens} must be >= 0")
        self.runner, self.scheduler, self.agent = runner, scheduler, agent
        self.unregistered_tokens = unregistered_tokens
        self.group = group or TPGroup()
        self.rooms: dict[int, _Room] = {}
        self.done: list[RoomDone] = []  # drained by take_output()
        self.newly_registered: list[int] = []  # registered on every rank now; drained likewise
        self.samples = Samples()  # drained by the caller
        layers = layer_groups(
            runner.model.config.num_hidden_layers,
            agent.config.layer_group,
            agent.config.layer_taper,
        )
        self.marks = _LayerMarks(layers, runner.kv.device)

    @property
    def busy(self) -> bool:
        return bool(self.rooms)

    def submit(self, room: int, prompt: list[int], params: SamplingParams) -> Sequence:
        """Take `prompt` for room `room` (computed from the next step on, or held until the room
        is registered: see the module's docstring); ValueError when it can never fit."""
        if room in self.rooms:
            raise ValueError(f"room {room} is already in use")
        seq = Sequence(prompt, params)
        self.scheduler.check(seq)
        self.rooms[room] = _Room(seq, self.agent.sender(room, len(prompt)))
        return seq

    def refuse(self, room: int, failure: Failure) -> None:
        """Report a submission that could not be taken."""
        self.done.append(RoomDone(room, failure))

    def live_rooms(self) -> list[int]:
        return list(self.rooms)

    def queues(self) -> dict[str, int]:
        unregistered = sum(not entry.registered for entry in self.rooms.values())
        return {
            "registering": unregistered,
            "prefilling": len(self.scheduler.waiting),
            "sending": len(self.rooms) - unregistered,
        }

    def take_output(self) -> StepOutput:
        progress = StepOutput(reserved=self.newly_registered, done=self.done)
        self.newly_registered, self.done = [], []
        return progress

    def abort(self, room: int, failure: Failure) -> None:
        """Stop computing and sending `room`; its pages go back once its sender has let go."""
        entry = self.rooms.get(room)
        if entry is not None:
            entry.sender.abort(failure)

    def step(self, before_forward: Callable[[], None] | None = None) -> bool:
        """Settle finished rooms, then one forward over the scheduled chunks; False when no
        forward ran. `before_forward` runs once the rooms are settled, before the forward is
        launched: the caller reports what settled without waiting for the forward."""
        self._settle()
        if before_forward is not None:
            before_forward()
        batch = self.scheduler.schedule()
        if not batch:
            return False
        began = time.perf_counter()
        rooms = {entry.seq.id: (room, entry) for room, entry in self.rooms.items()}
        # handed over before the forward, filled in while it is launched: the transfer thread
        # gathers each layer group as soon as its layers are queued on the device
        written = KVWritten()
        for work in batch:
            slots = self.runner.blocks.slots(work.seq.id, work.start, work.count)
            with contextlib.suppress(TransferFailed):  # settled with the other ranks next step
                sender = rooms[work.seq.id][1].sender
                sender.add_tokens(slots, written=written, last=work.completes_prompt)
        logits = self.runner.forward(batch, after_layer=self.marks.begin(written))
        future = self.runner.sample_prompt_ends(batch, logits)
        written.complete(future.event if future else _forward_event(self.runner.kv.device))
        for row, work in enumerate(future.batch if future else ()):  # the prompts it finished
            sender = rooms[work.seq.id][1].sender
            if work.seq.id in future.errors:  # its first token could not be drawn: the room fails
                sender.abort(Failure(FailureKind.INTERNAL, future.errors[work.seq.id]))
            else:  # drawn on the device: the sender reads the token, and whether the draw
                # failed, once the forward's fence (the copy that fills them) has fired
                failed = None if future.failed is None else future.failed[row]
                sender.first_token_is(future.host[row], wake=False, failed=failed, why=DRAW_FAILED)
        self.agent.wake()  # one turn for the chunks handed over above and their first tokens
        self.samples.forward_s.append(time.perf_counter() - began)
        for seq in self.scheduler.computed(batch):
            seq.finish("prefilled")
            rooms[seq.id][1].computed_at = time.monotonic()
        return True

    def _settle(self) -> None:
        """Rooms now registered on every rank go to the scheduler (and new ones within the
        unregistered budget before that); rooms delivered on every rank, or failed on any,
        leave: the prompt stops computing and its pages are freed (a failed room's sender is
        aborted here first, so nothing reads the pages afterwards). Every rank decides the same
        from the same rooms and verdicts."""
        rooms = list(self.rooms.items())
        verdicts = self.group.verdicts([entry.sender.poll() for _, entry in rooms])
        budget = self.unregistered_tokens - sum(
            entry.seq.num_prompt for entry in self.rooms.values() if entry.admitted
            and not entry.registered
        )  # fmt: skip
        for (room, entry), verdict in zip(rooms, verdicts, strict=True):
            if verdict is Verdict.BOOTSTRAPPING:
                if not entry.admitted and entry.seq.num_prompt <= budget:
                    budget -= entry.seq.num_prompt
                    self._admit(entry)
                continue
            if verdict is not Verdict.FAILED and not entry.registered:  # the same step on
                entry.registered = True  # every rank, in submission order
                self.newly_registered.append(room)
            if verdict is Verdict.WAIT:
                self._admit(entry)
                continue
            error = None
            if verdict is Verdict.FAILED:
                error = entry.sender.failure or ELSEWHERE
                entry.sender.abort(error)
                if not entry.seq.finished:
                    self.scheduler.remove(entry.seq)
            del self.rooms[room]
            self.runner.blocks.deallocate(entry.seq.id)
            self.runner.sampler.forget(entry.seq.id)
            if error is None and entry.computed_at is not None:
                self.samples.transfer_s.append(time.monotonic() - entry.computed_at)
            self.done.append(RoomDone(room, error))

    def _admit(self, entry: _Room) -> None:
        if not entry.admitted:
            entry.admitted = True
            self.scheduler.add(entry.seq)


class _LayerMarks:
    """Events on the compute stream after each transfer layer group of a forward (none after
    the last layer: the forward's own event covers it), each handed to the forward's KVWritten
    as it is recorded. Inactive on a CPU, where the forward is done when it returns, and in
    whole-chunk mode.

    The transfer thread is not woken per group: the forward's hand-over wakes it once, and it
    queues every group's gather behind that group's event. Where the forward is bound by the
    device, the host has queued it well ahead of the device and the first groups still travel
    while later layers compute; where it is bound by the host (its Python), a wake per group
    only took the GIL from the forward's launch for gathers the device could not run sooner
    (docs/benchmarks.md, "Layer groups without a wake each")."""

    def __init__(self, groups: list[range], device: torch.device) -> None:
        self.ends = frozenset(group.stop for group in groups[:-1])  # the last: the forward's
        self.active = bool(self.ends) and device.type == "cuda"
        self._written: KVWritten | None = None

    def begin(self, written: KVWritten):
        """For the next forward, whose KV `written` describes: the `after_layer` hook to give
        it, None when inactive."""
        self._written = written
        return self.record if self.active else None

    def record(self, layers_done: int) -> None:
        if layers_done in self.ends:
            event = torch.cuda.Event()
            event.record()
            self._written.layers_written(layers_done, event)


def _forward_event(device: torch.device) -> torch.cuda.Event | None:
    """Marks the end of the queued forward on the compute stream (None on a CPU: it is done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
