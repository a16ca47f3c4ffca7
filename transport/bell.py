"""A doorbell one thread rings and another sleeps on: a pipe whose read end any poller or
`multiprocessing.connection.wait` can watch. Rings between two clears coalesce into one byte.
The transfer loop's wake-ups, the loopback data plane's arrivals and the engine's room news
are all bells."""

from __future__ import annotations

import contextlib
import os
import threading

from kvferry.staging import fd_read


class Bell:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._rung = False
        self._closed = False
        self._lock = threading.Lock()  # the pipe is closed under it: never write a stale fd
        self._forward: int | None = None

    def forward_to(self, fd: int) -> None:
        """Also write a byte to `fd` (a pipe someone else sleeps on) at every ring, uncoalesced:
        only the owner of that pipe knows when it has looked."""
        os.set_blocking(fd, False)
        self._forward = fd

    def fileno(self) -> int:
        return self._read

    def ring(self) -> None:
        """Wake whoever waits on the bell; safe from any thread, never blocks."""
        if self._forward is not None:
            with contextlib.suppress(OSError):  # full: it is awake anyway
                os.write(self._forward, b"x")
        if self._rung:  # a byte is waiting already (a stale answer: the waiter clears first)
            return
        with self._lock:
            if self._closed:
                return
            self._rung = True
            with contextlib.suppress(BlockingIOError):  # full: it is ringing already
                os.write(self._write, b"x")

    def clear(self) -> None:
        """Silence the bell before looking at what it rang for: a ring after this wakes the
        next wait. Emptied before it is marked silent, under the lock a ringer writes under:
        were a ring's byte drained after it saw the bell silent, later rings would take it
        for ringing and skip their byte, and nothing would wake the waiter again."""
        with self._lock:
            if not self._closed:
                # One read empties it: a byte is written only under this lock by a ringer that
                # saw the bell silent, so a few bytes at most wait (a cleared bell reads none).
                # Read with the GIL held: the loop thread clears its bell on every turn.
                fd_read.drain(self._read)
            self._rung = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


def drain(fd: int) -> bool:
    """Read a non-blocking pipe empty; False once every writer has closed it."""
    try:
        while True:
            if not os.read(fd, 4096):
                return False
    except BlockingIOError:
        return True
