"""The thread that drives one rank's transfers.

Each turn: run calls posted by other threads, read every waiting control frame, then let the
owner make progress (start copies, post sends, take arrived data, check timers). It sleeps in
zmq.Poller only while the owner reports nothing in flight; otherwise it polls at a short period.
The owner says which sockets the poller watches (`watch`); each turn it is handed the readable ones.

A failure of one message or one room is the owner's to contain; an exception that reaches this
loop is a failure of the machinery itself: the thread ends and `alive` turns False (fatal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

BUSY_SLEEP_S = 0.0002  # pause between turns while copies or messages are in flight
IDLE_POLL_MS = 50  # longest sleep while idle (timers are checked at least this often)


class AgentLoop:
    def __init__(
        self,
        name: str,
        on_frames: Callable[[set], None],
        step: Callable[[float], bool],
    ) -> None:
        self._on_frames = on_frames  # on_frames(readable sockets)
        self._step = step  # step(now) -> True while work is in flight
        self._posted: deque[Callable[[], None]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_read, zmq.POLLIN)
        self._stopping = threading.Event()
        self._pipe_lock = threading.Lock()
        self.error: BaseException | None = None
        self._cpu_at_exit = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, socket: zmq.Socket, on: bool) -> None:
        """Start (on) or stop waking for frames on `socket`: before start or on the loop thread."""
        if on:
            self._poller.register(socket, zmq.POLLIN)
        else:
            self._poller.unregister(socket)

    def post(self, call: Callable[[], None]) -> None:
        """Run `call` on the loop thread soon; safe from any thread."""
        self._posted.append(call)
        self.wake()

    def wake(self) -> None:
        with self._pipe_lock:  # the pipe is closed under this lock: never write to a stale fd
            if self._stopping.is_set():
                return
            with contextlib.suppress(BlockingIOError):  # a full pipe: the loop wakes anyway
                os.write(self._wake_write, b"x")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and release its wake-up pipe; idempotent."""
        with self._pipe_lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_write, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        with self._pipe_lock:
            os.close(self._wake_read)
            os.close(self._wake_write)

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

    def _run(self) -> None:
        busy = False
        try:
            while not self._stopping.is_set():
                events = dict(self._poller.poll(0 if busy else IDLE_POLL_MS))
                if busy and not events and not self._posted:
                    time.sleep(BUSY_SLEEP_S)
                if self._wake_read in events:
                    self._drain_wakeups()
                while self._posted:
                    self._posted.popleft()()
                self._on_frames(events.keys() - {self._wake_read})
                busy = self._step(time.monotonic())
        except BaseException as exc:  # the owner fails every room on this; nothing may hang
            log.exception("transfer loop %s died", self._thread.name)
            self.error = exc
        finally:
            self._cpu_at_exit = time.thread_time()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
