"""A log that writes at most one line per kind every few seconds.

What a peer sends decides how often a server would log about it; without a limit a stream of
bad frames becomes a stream of log lines (disk, CPU). Counters in metrics carry the totals; the
log keeps one example per period and says how many it left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DEFAULT_PERIOD_S = 10.0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        period_s: float = DEFAULT_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self.period_s, self._clock = logger, period_s, clock
        self._next: dict[str, float] = {}  # kind -> when its next line may be written
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args, exc_info=None) -> bool:
        """Log `msg % args` at WARNING unless `kind` was logged within the period; True if
        written. Kinds are a fixed set chosen by the caller, never text from a peer."""
        return self._write(logging.WARNING, kind, msg, args, exc_info)

    def error(self, kind: str, msg: str, *args, exc_info=None) -> bool:
        """As `warning`, at ERROR: for what is a bug here, whoever made it happen."""
        return self._write(logging.ERROR, kind, msg, args, exc_info)

    def _write(self, level: int, kind: str, msg: str, args: tuple, exc_info) -> bool:
        now = self._clock()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._next[kind] = now + self.period_s
        left_out = self._suppressed.pop(kind, 0)
        if left_out:
            msg += f" ({left_out} more suppressed)"
        self._log.log(level, msg, *args, exc_info=exc_info, stacklevel=3)  # the caller's line
        return True
