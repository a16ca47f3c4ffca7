"""The ranks' reports, read on the daemon's event loop as they come.

Every rank reports over its own pipe: rank 0 its steps' outputs (`StepOutput`), every rank its
snapshots and a Fatal error. Once the ranks are ready the pipes are read on the HTTP front's
loop (`watch`), which writes the streams out: a step's tokens reach the handlers waiting for
them in that thread, with no other thread to wake and no GIL to hand over between the two. A
Fatal report, or one that cannot be read, ends the reading and wakes the daemon's thread,
which waits on `fatal_fd` beside the ranks' exits. Before the ranks are told to stop, `unwatch`
gives the pipes back to the daemon's thread, which takes their last reports itself (`read`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable

from kvferry.daemon.server import protocol

log = logging.getLogger("kvferry.daemon")


class RankFailed(RuntimeError):
    """A rank reported Fatal or exited on its own."""


class RankReports:
    """`conns`: the ranks' pipes; `send_lock`: the lock the daemon's commands to them are sent
    under."""

    def __init__(self, conns: list, send_lock: threading.Lock | None = None) -> None:
        self._conns = conns
        self._send_lock = send_lock or threading.Lock()
        self._loop = None  # where the pipes are read, between `watch` and `unwatch`
        self.fatal: str | None = None  # the error of a Fatal report read on the loop
        self.fatal_fd, self._fatal_write = os.pipe()  # readable once `fatal` is set
        weakref.finalize(self, _close, self.fatal_fd, self._fatal_write)

    def watch(self, loop, handle: Callable[[object], None]) -> None:
        """From now until `unwatch`, read the reports on `loop` as they come and hand each to
        `handle` there."""
        self._loop = loop
        loop.call_soon_threadsafe(self._add_readers, loop, handle)

    def unwatch(self, timeout_s: float = 5.0) -> None:
        """Stop reading on the loop; returns once a read under way there has ended (or the
        loop no longer runs, or after `timeout_s`)."""
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        removed = threading.Event()

        def remove() -> None:
            self._remove_readers(loop)
            removed.set()

        try:
            loop.call_soon_threadsafe(remove)
        except RuntimeError:  # closed meanwhile: nothing reads any more
            return
        for _ in range(max(1, round(timeout_s / 0.05))):
            if removed.wait(0.05) or not loop.is_running():
                return
        log.warning("the event loop did not stop reading the ranks' reports in %gs", timeout_s)

    def read(self, conn, handle: Callable[[object], None]) -> bool:
        """Hand every report `conn` holds now to `handle`; False once the pipe reads as closed
        (the rank's exit shows through its sentinel); RankFailed on a Fatal report, or one that
        cannot be read (the pipe's stream is lost past it)."""
        while conn.poll():
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return False
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                raise RankFailed(f"a rank's report could not be read: {why}") from None
            if isinstance(message, protocol.Fatal):
                log.error("%s", message.error)
                raise RankFailed(message.error)
            handle(message)
        return True

    def _add_readers(self, loop, handle: Callable[[object], None]) -> None:
        # uvloop makes a descriptor it watches non-blocking (libuv's poll handle does), but a
        # pipe's messages are read whole (a message half-written is waited for) and the
        # commands to a rank are sent whole from other threads: put back as it was, before a
        # command can be sent meanwhile
        with self._send_lock:
            for conn in self._conns:
                loop.add_reader(conn.fileno(), self._readable, loop, conn, handle)
                os.set_blocking(conn.fileno(), True)

    def _remove_readers(self, loop) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):  # a pipe closed meanwhile
                loop.remove_reader(conn.fileno())

    def _readable(self, loop, conn, handle: Callable[[object], None]) -> None:
        try:
            if not self.read(conn, handle):  # closed: a pipe at its end would read forever
                loop.remove_reader(conn.fileno())
        except RankFailed as exc:
            self._remove_readers(loop)
            self.fatal = str(exc)
            os.write(self._fatal_write, b"!")


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
