"""The engine-facing handles of one room: KVSender on a prefill rank, KVReceiver on a decode
rank. Usable by any scheduler; thread-safe, and no method blocks: they post work to the rank's
transfer thread and read the room's status.

`KVWritten` (from send_room.py) is part of the engine's side: how a prefill engine describes,
while it launches a forward, when each layer group's KV is written.

The contract with the agents is their public methods only: `post` (to the loop thread),
`add_tokens_on_loop` / `first_token_on_loop` / `abort_on_loop` (run there), `registered` and
`thread_failure`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvferry.staging.copy_stream import Fence
from kvferry.staging.kv_copy import host_slots
from kvferry.transport.failure import Failure, aborted
from kvferry.transport.room import KVPoll, TransferFailed
from kvferry.transport.send_room import KVWritten

if TYPE_CHECKING:
    from kvferry.transport.receiver import DecodeAgent
    from kvferry.transport.sender import PrefillAgent

PREFILL_ABORT = aborted("aborted by the prefill engine")
DECODE_ABORT = aborted("aborted by the decode engine")


class KVSender:
    """The engine's handle on one room at a prefill rank. Thread-safe; never blocks."""

    def __init__(self, agent: PrefillAgent, room: int, num_tokens: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        self.agent, self.room, self.num_tokens = agent, room, num_tokens
        self.status = None  # the room's RoomStatus, set on the loop thread
        self._tokens = 0

    def add_tokens(
        self,
        slots,
        ready: torch.cuda.Event | None = None,
        *,
        first_token: int | torch.Tensor | None = None,
        last: bool = False,
        layers_ready: Sequence[tuple[int, torch.cuda.Event]] = (),
        written: KVWritten | None = None,
    ) -> None:
        """KV of the next len(slots) prompt tokens is (or, once `ready` fires, will be) in
        `slots`; `last` with the prompt's final tokens, carrying the sampled `first_token` (an
        int, or a one-element host tensor that is filled by the time `ready` fires).
        `layers_ready`: (n, event) pairs, n ascending — layers [0, n) are written once that
        event fires, so layer-wise messages can leave before the whole forward is done.
        `written`, instead of `ready` and `layers_ready`: a KVWritten the engine fills in while
        it launches the forward (handed over before it); the first token of `last` tokens then
        follows with `first_token_is`."""
        if self.poll() == KVPoll.Failed:
            raise TransferFailed(self.failure)
        slots = host_slots(slots).copy()
        self._tokens += len(slots)
        if self._tokens > self.num_tokens:
            raise ValueError(
                f"room {self.room:#x}: {self._tokens} tokens added, "
                f"the prompt has {self.num_tokens}"
            )
        later = written is not None and last and first_token is None
        # A KVWritten is filled in while the forward is launched, and the engine wakes the loop
        # as it does (each layer group, then the whole forward): nothing can leave before that,
        # so this call waits for that turn instead of taking one of its own during the launch.
        wake = written is None
        if written is None:
            written = KVWritten(Fence(ready), [(n, Fence(event)) for n, event in layers_ready])
        self.agent.post(
            lambda: self.agent.add_tokens_on_loop(
                self.room, slots, written, first_token, last, later
            ),
            wake,
        )

    def first_token_is(
        self,
        token: int | torch.Tensor,
        wake: bool = True,
        failed: torch.Tensor | None = None,
        why: str = "",
    ) -> None:
        """The first token, after tokens added with `written` and `last` (an int, or a
        one-element host tensor filled by the time the forward's fence fires). `failed`: a
        one-element host bool tensor filled with it, set where the draw failed — the room then
        fails for `why` instead of completing. `wake=False` for a caller that wakes the agent
        itself right after."""
        self.agent.post(lambda: self.agent.first_token_on_loop(self.room, token, failed, why), wake)

    def poll(self) -> KVPoll:
        if self.status is None:  # not claimed yet: the registrations may have come first
            early = self.agent.registered(self.room)
            return self._loop_state(KVPoll.WaitingForInput if early else KVPoll.Bootstrapping)
        return self._loop_state(self.status.state)

    @property
    def failure(self) -> Failure | None:
        """Why the room failed (None unless it did)."""
        if self.status is not None and self.status.failure:
            return self.status.failure
        return self.agent.thread_failure

    def abort(self, failure: Failure = PREFILL_ABORT) -> None:
        self.agent.post(lambda: self.agent.abort_on_loop(self.room, failure))

    def _loop_state(self, state: KVPoll) -> KVPoll:
        if state < KVPoll.Success and self.agent.thread_failure:
            return KVPoll.Failed
        return state


class KVReceiver:
    """The engine's handle on one room at a decode rank. Thread-safe; never blocks.

    Success: every message is in, and the scatters that put it into the KV pages are queued on
    the rank's copy stream (the last one is `kv_fence`). Whatever reads the pages is ordered
    after them: an engine calls `order_kv()` before queuing work that reads them, a host reader
    `wait_kv()`. Work queued after that on either stream may then also reuse the pages.
    Failed is reported only once nothing queued for the room can still write into its KV pages,
    so the engine may reuse them as soon as it sees Failed.
    """

    def __init__(self, agent: DecodeAgent, room: int, slots: np.ndarray, bootstrap: str) -> None:
        if not slots.size:
            raise ValueError("a room needs at least one prompt token")
        self.agent, self.room, self.slots, self.bootstrap = agent, room, slots, bootstrap
        self.num_tokens = len(slots)
        self.status = None  # the room's RoomStatus, set on the loop thread
        self.first_token: int | None = None  # sampled by prefill; set before Success shows
        self.marks: dict[str, float] = {}  # the room's timeline (timeline.py); set with Success
        self.kv_fence: Fence | None = None  # the last scatter of the room's KV; set with Success
        # called on the transfer thread as the room succeeds, just before Success shows, with
        # first_token, marks and kv_fence set (DecodeAgent.receiver)
        self.on_success: Callable[[KVReceiver], None] | None = None
        self.first_token_reported = False  # on_success sent the first token on (the engine's)
        self._rejected: Failure | None = None

    def poll(self) -> KVPoll:
        if self._rejected or (self.status is None and self.agent.thread_failure):
            return KVPoll.Failed
        if self.status is None:
            return KVPoll.Bootstrapping
        if self.status.state < KVPoll.Success and self.agent.thread_failure:
            return KVPoll.Failed
        return self.status.state

    def order_kv(self, stream: int | None = None) -> None:
        """After Success: make work queued later on `stream` (a raw cudaStream_t; by default
        torch's current stream on the cache's device) wait until the room's KV is in the cache.
        Nothing to do on a CPU, or once the scatters ran."""
        fence = self.kv_fence
        if fence is None or not fence.handle:
            return
        device = self.agent.planes.device.index or 0
        if stream is None:
            stream = torch.cuda.current_stream(device).cuda_stream
        fence.order(stream, device)

    def wait_kv(self) -> None:
        """After Success: block until the room's KV is in the cache (for a reader on the host)."""
        if self.kv_fence is not None:
            self.kv_fence.synchronize()

    @property
    def kv_arrived(self) -> bool:
        """Whether any of the room's KV reached this rank (before it succeeded or failed)."""
        return self.status is not None and self.status.reached >= KVPoll.Transferring

    @property
    def failure(self) -> Failure | None:
        """Why the room failed (None unless it did)."""
        if self._rejected:
            return self._rejected
        if self.status is not None and self.status.failure:
            return self.status.failure
        return self.agent.thread_failure

    def abort(self, failure: Failure = DECODE_ABORT) -> None:
        self.agent.post(lambda: self.agent.abort_on_loop(self, failure))

    def reject(self, failure: Failure) -> None:
        self._rejected = failure
