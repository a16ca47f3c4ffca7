"""The thread that drives one rank's transfers.

It sleeps until something happens: a control frame, a call posted by another thread (its bell),
the data plane's own event descriptor (a UCX completion or arrival), a copy finishing (the copy
stream's descriptor, which the driver makes readable), or the owner's next deadline. It sleeps
in one zmq.Poller, or, where the owner gives it a sleeper (`sleep_with`: the native UCX data
plane's), in native code without the GIL that takes the data plane's own events itself (a
rendezvous, a fragment, a completion that launches a scatter) and wakes the loop only when its
owner has something to do: the GIL and a turn of Python are then spent per completion, not per
UCX event.
Each turn then runs the posted calls, reads every waiting control frame and lets the owner make
progress (start copies, post sends, take arrived data, check timers). The owner's step says how
long the loop may sleep before its next turn without an event: 0 when it left work for later in
this turn's budget, its timer period otherwise. Nothing spins.

A failure of one message or one room is the owner's to contain; an exception that reaches this
loop is a failure of the machinery itself: the thread ends and `alive` turns False (fatal).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from kvferry.transport.bell import Bell

log = logging.getLogger(__name__)
# How long a woken loop may wait for the GIL while another thread of its process runs Python (an
# engine launching a forward). CPython's default is 5 ms: every hop of a transfer (a layer
# group's gather, a send, a scatter) would wait that long behind a host-bound forward. Only
# a thread waiting for the GIL asks its holder to switch, so an uncontended process pays
# nothing for a shorter interval.
GIL_SWITCH_S = 0.0002
# what woke a turn (AgentLoop.wakes): its bell (posted calls), a watched descriptor's cause (the
# data plane, the copy stream, the control sockets), its timer, or nothing (the turn before
# left work and asked for this one at once)
WAKE_CAUSES = ("bell", "data", "copies", "control", "timer", "at_once")
# sleeper(descriptors, timeout_s) -> (why, the descriptors readable, CPU spent in the data plane)
Sleeper = Callable[[tuple, float], tuple[str, tuple, float]]


class AgentLoop:
    def __init__(
        self,
        name: str,
        on_frames: Callable[[set], None],
        step: Callable[[float], float],
        on_start: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        """`step(now)` -> seconds the loop may sleep without an event; `on_start` runs first,
        on the loop thread, `on_exit` last (also when the thread dies)."""
        self._on_frames = on_frames  # on_frames(readable sockets)
        self._step = step
        self._on_start, self._on_exit = on_start, on_exit
        self._posted: deque[Callable[[], None]] = deque()
        self._bell = Bell()  # posted calls, stop
        self._poller = zmq.Poller()
        self._poller.register(self._bell.fileno(), zmq.POLLIN)
        self._cause_of: dict = {self._bell.fileno(): "bell"}  # watched socket or fd -> cause
        self.wakes = dict.fromkeys(WAKE_CAUSES, 0)  # turns by cause (a turn counts once each)
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.turns = 0  # turns taken; an idle loop takes one per timer period
        self.timer_turns = 0  # of which nothing but the timeout woke the loop
        self.timed_out = False  # the turn running now was woken by the timeout alone
        self.nudged = False  # the turn running now was woken by its bell (posted calls, wake)
        # CPU the thread spent in its wait: the poll itself and re-taking the GIL after it
        # (which costs wake-ups while another thread of the process runs Python)
        self.wait_cpu_s = 0.0
        # sleeping in native code (`sleep_with`): the sleeper, the data plane's descriptor it
        # watches itself, and the loop's other descriptors (rebuilt when `watch` changes them)
        self._sleeper: Sleeper | None = None
        self._data_fd: int | None = None
        self._fds: tuple[int, ...] | None = None
        self._watched_by_fd: dict[int, object] = {}  # descriptor -> the socket or fd watched
        self._waiting: Callable[[], list] = list
        self._cpu_at_exit = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread; the process's GIL switch interval drops to GIL_SWITCH_S (never
        raised) so that it gets the GIL soon after each event."""
        if sys.getswitchinterval() > GIL_SWITCH_S:
            sys.setswitchinterval(GIL_SWITCH_S)
        self._thread.start()

    def watch(self, socket, on: bool, cause: str = "control") -> None:
        """Start (on) or stop waking for input on `socket` (a zmq socket or a file descriptor),
        whose wakes count under `cause` (one of WAKE_CAUSES): before start or on the loop
        thread."""
        if on:
            self._poller.register(socket, zmq.POLLIN)
            self._cause_of[socket] = cause
        else:
            self._poller.unregister(socket)
            self._cause_of.pop(socket, None)
        self._fds = None

    def sleep_with(self, sleeper: Sleeper, data_fd, waiting: Callable[[], list]) -> None:
        """Sleep in `sleeper(fds, timeout_s)` rather than in the poller: it watches `fds` (the
        loop's descriptors but `data_fd`) and the data plane itself, and answers (why, the
        descriptors of `fds` readable, CPU spent inside the data plane); why: "data" (the owner
        has the plane's news to take: a turn woken by `data_fd`), "fds" or "timer"
        (DataPlane.sleep). `waiting()`: the watched zmq sockets whose frames their descriptors
        may not tell of (ControlChannel.waiting), looked at before each sleep. Before start."""
        self._sleeper, self._data_fd, self._waiting = sleeper, data_fd, waiting

    def post(self, call: Callable[[], None], wake: bool = True) -> None:
        """Run `call` on the loop thread soon; safe from any thread. `wake=False` leaves it for
        the loop's next turn: for a caller that wakes the loop itself a little later, so that
        several calls cost one turn."""
        self._posted.append(call)
        if wake:
            self.wake()

    def wake(self) -> None:
        """Give the loop a turn now; safe from any thread."""
        self._bell.ring()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and release its bell; idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._bell.ring()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self._bell.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def cpu_seconds(self) -> float:
        """CPU time the loop thread has used so far (0 before it starts); from any thread."""
        if self._thread.ident is None or not self._thread.is_alive():
            return self._cpu_at_exit
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))
        except (OSError, AttributeError):  # gone meanwhile, or a platform without the clock
            return self._cpu_at_exit

    def _count_wake(self, events: dict, slept_s: float) -> None:
        if events:
            for cause in {self._cause_of.get(key, "control") for key in events}:
                self.wakes[cause] += 1
        else:
            self.wakes["timer" if slept_s > 0 else "at_once"] += 1

    def _wait(self, sleep_s: float) -> tuple[dict, float]:
        """The watched sockets readable after sleeping at most `sleep_s` (none: the timeout),
        and the CPU the sleeper spent inside the data plane."""
        if self._sleeper is None:
            return dict(self._poller.poll(math.ceil(sleep_s * 1000))), 0.0
        # zmq's descriptors only tell of what came after its sockets were last used: those used
        # since (or new ones) are looked at first
        if self._fds is None:
            self._fds = self._descriptors()
            events = dict(self._poller.poll(0))
        else:
            events = dict.fromkeys(self._waiting(), zmq.POLLIN)
        inside, deadline = 0.0, time.monotonic() + sleep_s
        while not events and sleep_s > 0:
            woke, ready, spent = self._sleeper(self._fds, sleep_s)
            inside += spent
            if woke == "data":
                return {self._data_fd: zmq.POLLIN}, inside
            watched = [self._watched_by_fd[fd] for fd in ready]
            if all(isinstance(w, int) for w in watched):  # descriptors of our own: readable
                events = dict.fromkeys(watched, zmq.POLLIN)
            else:  # a zmq socket's descriptor stirs on more than frames: ask the socket
                events = dict(self._poller.poll(0))
            if woke == "timer":
                break
            sleep_s = deadline - time.monotonic()
        return events, inside

    def _descriptors(self) -> tuple[int, ...]:
        """What the sleeper watches for the loop: every watched socket's descriptor but the
        data plane's."""
        self._watched_by_fd = {
            (w if isinstance(w, int) else w.getsockopt(zmq.FD)): w for w in self._cause_of
        }
        return tuple(fd for fd in self._watched_by_fd if fd != self._data_fd)

    def _run(self) -> None:
        sleep_s = 0.0
        try:
            if self._on_start is not None:
                self._on_start()
            while not self._stopping.is_set():
                before = time.thread_time()
                events, inside = self._wait(sleep_s)
                self.wait_cpu_s += time.thread_time() - before - inside
                self.turns += 1
                self.timed_out = not events and sleep_s > 0
                self.timer_turns += self.timed_out
                self._count_wake(events, sleep_s)
                self.nudged = self._bell.fileno() in events
                if self.nudged:
                    self._bell.clear()
                for _ in range(len(self._posted)):  # not those they post: the frames come first
                    self._posted.popleft()()
                self._on_frames(events.keys() - {self._bell.fileno()})
                sleep_s = 0.0 if self._posted else self._step(time.monotonic())
        except BaseException as exc:  # the owner fails every room on this; nothing may hang
            log.exception("transfer loop %s died", self._thread.name)
            self.error = exc
        finally:
            self._cpu_at_exit = time.thread_time()
            if self._on_exit is not None:
                self._on_exit()
