"""A doorbell one thread rings and another sleeps on: a pipe whose read end any poller or
`multiprocessing.connection.wait` can watch. Rings between two clears coalesce into one byte."""

from __future__ import annotations

import contextlib
import os


class Bell:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._rung = False
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def ring(self) -> None:
        """Wake whoever waits on the bell; safe from any thread, never blocks."""
        if self._rung or self._closed:
            return
        self._rung = True
        with contextlib.suppress(BlockingIOError, OSError):  # full: it is ringing already
            os.write(self._write, b"x")

    def clear(self) -> None:
        """Silence the bell before looking at what it rang for: a ring after this wakes the
        next wait."""
        self._rung = False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._read)
            os.close(self._write)
