"""The ranks' reports, read on the daemon's event loop as they come.

Every rank reports over its own pipe: rank 0 its steps' outputs (`StepOutput`), every rank its
snapshots and a Fatal error. Once the ranks are ready the pipes are read on the HTTP front's
loop (`watch`), which writes the streams out: a step's tokens reach the handlers waiting for
them in that thread, with no other thread to wake and no GIL to hand over between the two. A
Fatal report ends the reading and wakes the daemon's thread, which waits on `fatal_fd` beside
the ranks' exits. Before the ranks are told to stop, `unwatch` gives the pipes back to the
daemon's thread, which takes their last reports itself (`read`).
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
    def __init__(self, conns: list) -> None:
        self._conns = conns
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
        (the rank's exit shows through its sentinel); RankFailed on a Fatal report."""
        while conn.poll():
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return False
            if isinstance(message, protocol.Fatal):
                log.error("%s", message.error)
                raise RankFailed(message.error)
            handle(message)
        return True

    def _add_readers(self, loop, handle: Callable[[object], None]) -> None:
        for conn in self._conns:
            loop.add_reader(conn.fileno(), self._readable, loop, conn, handle)

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
