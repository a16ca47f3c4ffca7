"""What every transfer agent is made of, prefill or decode: its staging ring and copy stream,
control channel, data plane, peer liveness and the loop thread. The role-specific agents
(sender.py, receiver.py) compose one and supply the message handler and the step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.copy_stream import CopyStream
from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.transport import curve
from kvferry.transport.bell import Bell
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import ControlChannel
from kvferry.transport.curve import CurveKeys
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.log_limit import RateLimitedLog
from kvferry.transport.loop import AgentLoop
from kvferry.transport.messages import (
    Codec,
    ErrorReply,
    FrameTooLarge,
    Heartbeat,
    Message,
    WireError,
)
from kvferry.transport.peers import PeerTracker
from kvferry.transport.slice_mode import SliceMode
from kvferry.transport.staged_mode import StagedMode

log = logging.getLogger(__name__)
# passes of progress and step one turn may add where arming finds events pending (_turn)
EXTRA_PASSES = 2
PEER_IDLE_S = 60.0  # an outbound socket to a peer holding no room is closed after this long
RECLAIM_EVERY_S = 1.0  # how often idle outbound sockets are looked for
# While data operations are in flight, the loop also takes a turn this often without an event: a
# backstop only, since every completion wakes it first (UCX's descriptor, which its CUDA
# transports make readable from a host function queued after their copies, and the copy
# stream's). Counted as timer turns.
IN_FLIGHT_CHECK_S = 0.005


@dataclass
class TransferStats:
    """Counters of one agent (exported as metrics by the daemons)."""

    ring_waits: int = 0  # chunks that found the staging ring full
    ring_wait_s: float = 0.0
    bad_frames: int = 0
    internal_errors: int = 0  # messages or rooms whose handling raised (the room failed)
    unexpected_messages: int = 0  # data messages for unknown or finished rooms (discarded)
    receives_ahead: int = 0  # decode: receives posted before their messages came (no probe)
    rooms_succeeded: int = 0
    copy_s: float = 0.0  # summed time from queuing a gather/scatter to its completion
    wire_s: float = 0.0  # summed time from posting a send/receive to its completion
    ucx_cpu_s: float = 0.0  # loop-thread CPU inside UCX's progress and arm calls
    failures: dict[str, int] = field(default_factory=dict)  # by FailureKind value
    limit_refusals: dict[str, int] = field(default_factory=dict)  # by the limit's config name

    def failed(self, failure: Failure) -> None:
        kind = failure.kind.value
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def refused_by(self, limit: str) -> None:
        self.limit_refusals[limit] = self.limit_refusals.get(limit, 0) + 1


class AgentCore:
    def __init__(
        self,
        name: str,
        config: TransferConfig,
        layout: KVLayout,
        planes: KVPlanes,
        data: DataPlane,
        on_message: Callable[[str, Message], None],
        step: Callable[[float], bool],
        on_peer_lost: Callable[[str, Failure], None],
        fail_room: Callable[[int, Failure], None],
        on_dropped: Callable[[str], None] | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        """`step(now)` advances the role's work and says whether operations are in flight;
        `fail_room(room, failure)` fails a room a message named when handling it raised;
        `on_dropped(peer)`, if given, hears of every outbound connection that dropped; `keys`:
        the deployment's CURVE pair (control sockets admit its members only)."""
        _check_planes(layout, planes)
        self.config, self.layout, self.planes, self.data = config, layout, planes, data
        self.stats = TransferStats()
        self.staging = (
            StagingBuffer(config.ring_bytes, planes.device) if config.mode == "staged" else None
        )
        if self.staging is not None:
            data.register_staging(
                self.staging.address, self.staging.capacity, planes.device.type == "cuda"
            )
        # rung on every change of a room's state: the engine's thread sleeps on it
        self.bell = Bell()
        self._zmq = curve.context(keys)
        self.loop = AgentLoop(
            name, self._read_frames, self._turn, data.on_loop_start, self.bell.ring
        )
        self.copies = CopyStream(planes.device)
        if self.copies.wake_fd is not None:
            self.loop.watch(self.copies.wake_fd, True, "copies")
        # how KV is packed into data messages; the pipelines move items through its steps
        self.mode = SliceMode() if config.mode == "slice" else StagedMode(self.staging, self.copies)
        if data.wake_fd is not None:
            self.loop.watch(data.wake_fd, True, "data")
        if data.sleeps:  # once the control channel is there (below)
            self.loop.sleep_with(self._sleep, data.wake_fd, lambda: self.control.waiting())
        # whether a message that comes while the loop sleeps wakes it (not while the oldest
        # waits for ring room: the scatters that free it wake the loop)
        self.messages_wake = True
        self.again = False  # the step left work for the next turn (its budget ran out)
        self.control = ControlChannel(
            self._zmq,
            Codec(config.max_frame_bytes),
            config.host,
            watch=self.loop.watch,
            monitor_peers=on_dropped is not None,
            ports=config.control_port_range,
        )
        self.peers = PeerTracker(config.heartbeat_interval_s, config.heartbeat_timeout_s)
        self._on_message, self._step, self._on_peer_lost = on_message, step, on_peer_lost
        self._fail_room, self._on_dropped = fail_room, on_dropped
        self.log = RateLimitedLog(log)
        self._next_reclaim = 0.0
        self._data_fd = data.wake_fd
        self._progress_due = True  # progress the data plane in the next turn (see _turn)
        self.progressed = False  # this turn progressed it (new arrivals may be waiting)
        self._data_only = False  # this turn was woken by the data plane's descriptor alone
        self._step_due = 0.0  # when the owner's step asked to run again without an event
        self.quiet_turns = 0  # turns that only progressed UCX's traffic (see _turn)
        self._accepted: dict[str, list[int]] = {}  # per peer: rooms to name in its heartbeat

    @property
    def zmq_context(self) -> zmq.Context:
        return self._zmq

    @property
    def thread_failure(self) -> Failure | None:
        """Why the loop thread died, or None while it runs (or before it started)."""
        if self.loop.error is not None:
            return Failure(FailureKind.RANK_EXITED, f"transfer thread died: {self.loop.error!r}")
        return None

    def close(self) -> None:
        self.loop.stop()
        self.copies.close()
        self.bell.close()
        self.control.close()
        self.data.close()
        curve.close(self._zmq)
        if self.staging is not None:
            self.staging.close()

    def endpoint(self, ucx_address: bytes, on_error: Callable[[bytes, str], None]):
        """Data-plane endpoint to a peer; its failure is handed to the loop thread."""
        return self.data.endpoint(
            ucx_address, lambda why: self.loop.post(lambda: on_error(ucx_address, why))
        )

    def refuse(self, peer: str, reason: str, room: int | None = None) -> None:
        """Answer a frame that cannot be served, back to whoever sent it (counted, the log
        rate-limited: a peer decides how often this happens)."""
        self.stats.bad_frames += 1
        self.log.warning("refused", "refused a frame from %r: %s", peer, reason)
        self.control.reply(peer, ErrorReply(reason, room))

    def accept(self, peer: str, room: int) -> None:
        """Tell `peer` in its next heartbeat that its registration of `room` is accepted."""
        self._accepted.setdefault(peer, []).append(room)

    def contain(self, exc: Exception, what: str) -> Failure:
        """Count and log an exception raised while handling one message or one room (that
        room fails, not the thread); the failure to fail the room with."""
        self.stats.internal_errors += 1
        self.log.warning("internal", "error handling %s", what, exc_info=exc)
        return Failure(FailureKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _sleep(self, fds: tuple[int, ...], timeout_s: float):
        woke, ready, inside = self.data.sleep(fds, timeout_s, self.messages_wake)
        self.stats.ucx_cpu_s += inside
        return woke, ready, inside

    def _read_frames(self, ready) -> None:
        self._data_only = len(ready) == 1 and self._data_fd in ready and not self.loop.nudged
        if self._data_fd in ready:
            self._progress_due = True
        if self.copies.wake_fd in ready:
            self.copies.collect()
        for peer, message in self.control.receive(ready):
            if isinstance(message, WireError):
                if isinstance(message, FrameTooLarge):
                    self.stats.refused_by("max_frame_bytes")
                self.refuse(peer, str(message))
                continue
            self.peers.heard(peer)
            if not isinstance(message, Heartbeat) or message.accepted:
                self._handle(peer, message)
        for peer in self.control.take_dropped():
            self._dropped(peer)

    def _handle(self, peer: str, message: Message) -> None:
        try:
            self._on_message(peer, message)
        except Exception as exc:  # one message's failure is its room's, never the thread's
            room = getattr(message, "room", None)
            failure = self.contain(exc, f"{type(message).__name__} from {peer!r}")
            if room is None:
                self.control.reply(peer, ErrorReply(str(failure)))
            else:
                self._fail_room(room, failure)

    def _dropped(self, peer: str) -> None:
        """The connection to `peer` dropped: whether it comes back is for heartbeats to tell
        while it holds rooms; otherwise its socket goes (a restarted peer has a new address)."""
        self._on_dropped(peer)
        if not self.peers.rooms_of(peer):
            self.control.forget(peer)

    def _turn(self, now: float) -> float:
        """One turn of the loop; how long it may sleep before the next without an event.

        The data plane is progressed (and armed again) only when it may have something to do:
        its descriptor fired, operations were posted since it last ran, its last arm found
        events pending, or the timer woke the loop. A turn woken by anything else (a posted
        call, a finished copy, a control frame) leaves UCX alone.

        A turn woken by the descriptor alone whose progress completed nothing and brought no
        new message (`DataPlane.quiet`: UCX moved a piece of a message still arriving, as its
        tcp transport does many times a message) arms the plane again and
        sleeps until the step's own deadline without running the step: nothing it looks at
        has changed.

        Where arming finds events pending (they came in meanwhile, or the step's own posts
        completed at once: a small send does), the turn progresses and steps again, up to
        EXTRA_PASSES times, rather than leave them to a turn of their own: no wait, no read of
        the control sockets, no heartbeat checks between."""
        progressing = self.progressed = (
            self._progress_due or self.data.posted or self.loop.timed_out
        )
        self._progress_due = False
        if progressing:
            self._progress()
            if self._data_only and self.data.quiet:
                self.quiet_turns += 1
                return self._rearm(now)
        in_flight = self._advance(now)
        for passes in range(EXTRA_PASSES + 1):
            if self.again:  # the step left work for the next turn, which comes at once
                self.again = False
                self._progress_due = True
                return 0.0
            if not (progressing or self.data.posted) or self._arm():
                break
            if passes == EXTRA_PASSES:  # still more: the next turn comes at once
                self._progress_due = True
                return 0.0
            self._progress()
            self.progressed = progressing = True
            in_flight = self._step(now)
        sleep_s = IN_FLIGHT_CHECK_S if in_flight else self.config.heartbeat_interval_s
        self._step_due = now + sleep_s
        return sleep_s

    def _progress(self) -> None:
        began = time.thread_time()
        self.data.progress()
        self.stats.ucx_cpu_s += time.thread_time() - began

    def _arm(self) -> bool:
        """Arm the data plane's descriptor; False if events are pending (it was not armed)."""
        began = time.thread_time()
        armed = self.data.arm()
        self.stats.ucx_cpu_s += time.thread_time() - began
        return armed

    def _rearm(self, now: float) -> float:
        """After a quiet progress: arm the plane and sleep until the step is due."""
        if not self._arm():
            self._progress_due = True
            return 0.0
        return max(0.0, self._step_due - now)

    def _advance(self, now: float) -> bool:
        """Heartbeats, silent peers, idle sockets, then the owner's step: whether operations
        are in flight."""
        due = self.peers.due_heartbeats(now)
        if due is not None:  # a round: a peer left out shares no room, its acceptances moot
            pending, self._accepted = self._accepted, {}
            for peer in due:
                accepted = pending.pop(peer, [])
                if not self.control.send(peer, Heartbeat(accepted)) and accepted:
                    self._accepted[peer] = accepted  # not queued: with the next heartbeat
        for peer in self.peers.silent(now):
            silent = f"peer lost: {peer} silent for over {self.config.heartbeat_timeout_s:g}s"
            self._on_peer_lost(peer, Failure(FailureKind.PEER_LOST, silent))
            self.peers.forget(peer)
            self.control.forget(peer)
        if now >= self._next_reclaim:
            self._next_reclaim = now + RECLAIM_EVERY_S
            for peer in self.control.idle(now, PEER_IDLE_S):
                if not self.peers.rooms_of(peer):
                    self.control.forget(peer)
        return self._step(now)


def _check_planes(layout: KVLayout, planes: KVPlanes) -> None:
    expected = (layout.num_planes, layout.local_heads, layout.head_dim, layout.itemsize)
    actual = (planes.num_planes, planes.num_heads, planes.head_dim, planes.itemsize)
    if expected != actual:
        raise ValueError(
            f"KV cache (planes, heads, head_dim, itemsize)={actual} does not match the "
            f"layout's {expected}"
        )
