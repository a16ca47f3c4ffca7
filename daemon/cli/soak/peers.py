"""Peer restarts during a soak, on a thread of their own: every `every_s` the next daemon of the
list is stopped and started again on the same addresses (a new incarnation its peers must
accept). Each restart is kept as a window; a request that overlaps a window, widened by `grace_s`
after it (the peers noticing the new incarnation), failed of an injected fault."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import msgspec

from kvferry.daemon.cli.launcher import Launcher, LaunchError

LOOK_AGAIN_S = 1.0  # between tries to measure a restarted daemon's new processes


class Restart(msgspec.Struct):
    name: str
    start: float  # time.monotonic() when it was stopped
    ready: float | None = None  # when it answered /health again; None: it did not
    error: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.ready is None else self.ready - self.start


class Restarter:
    """Restarts `names` in turn, the first `every_s` after start(), until stop()."""

    def __init__(
        self,
        launcher: Launcher,
        names: Sequence[str],
        every_s: float,
        ready_timeout_s: float,
        on_restart: Callable[[], bool] = lambda: True,
        before_restart: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.restarts: list[Restart] = []
        self._launcher, self._names, self._every_s = launcher, list(names), every_s
        self._ready_timeout_s = ready_timeout_s
        # after each restart, until it returns True: the caller measures the new processes
        self._on_restart = on_restart
        self._before_restart = before_restart  # the caller measures what is about to stop
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-restarts", daemon=True)

    def start(self) -> None:
        if self._names:
            self._thread.start()

    def stop(self) -> None:
        """Waits for a restart under way to end."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        turn = 0
        while not self._stopped.wait(self._every_s):
            self._restart(self._names[turn % len(self._names)])
            turn += 1

    def _restart(self, name: str) -> None:
        self._before_restart(name)
        restart = Restart(name, time.monotonic())
        self.restarts.append(restart)
        try:
            self._launcher.restart(name, self._ready_timeout_s)
            restart.ready = time.monotonic()
            while not self._on_restart() and not self._stopped.wait(LOOK_AGAIN_S):
                pass
        except LaunchError as exc:
            restart.error = str(exc)


def injected(start: float, end: float, restarts: Sequence[Restart], grace_s: float) -> bool:
    """Whether a request that ran from `start` to `end` overlapped a restart's window."""
    for restart in restarts:
        until = (restart.ready if restart.ready is not None else float("inf")) + grace_s
        if start <= until and end >= restart.start:
            return True
    return False
