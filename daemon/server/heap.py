"""The Python heap of a daemon's processes: what they build at start is frozen out of the
garbage collector's passes, and every pass is timed.

A daemon or rank process holds a few hundred thousand objects that live as long as it does:
torch, the model's modules, uvicorn, the tokenizer. CPython's full collection walks every one of
them with the GIL held (94 ms on the development machine's CPU, `bench/gc_pauses.py`) and runs
whenever the objects that outlived younger passes reach a quarter of those it kept the last
time: how often depends on what requests keep alive (`kvferry bench` prints each process's
passes). Every thread of the process stops meanwhile: the HTTP front's streams, a rank's engine
steps and its transfer thread.

`freeze()`, called once a process is ready to serve, moves everything alive then to the
permanent generation, which no pass walks; later passes see only what was made since.
`GCPauses` times each pass (`gc.callbacks`) for the metrics, `kvferry_gc_pause_seconds`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import deque

log = logging.getLogger("kvferry.daemon")
KEPT = 4096  # passes timed but not yet taken; past this the oldest are dropped


class GCPauses:
    """Times every collection of this process once `start` is called: `take` hands over
    (generation, seconds) of each since the last take. The callback runs in whatever thread
    triggered the pass, with the GIL held and the collector off: it only appends to a deque,
    taking no lock (a lock held by the interrupted thread would never be released)."""

    def __init__(self) -> None:
        self._pauses: deque[tuple[int, float]] = deque(maxlen=KEPT)
        self._began = 0.0

    def start(self) -> GCPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def take(self) -> list[tuple[int, float]]:
        """The passes timed since the last take (safe from several threads at once)."""
        taken = []
        with contextlib.suppress(IndexError):  # another thread took the rest
            for _ in range(len(self._pauses)):
                taken.append(self._pauses.popleft())
        return taken

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._began))


def freeze(who: str, pauses: GCPauses | None = None) -> int:
    """Collect once, then move every object alive to the permanent generation (what a process
    built at start: modules, model, servers), out of every later pass; returns how many.
    `pauses` times the passes from then on."""
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    took = (time.perf_counter() - began) * 1e3
    log.info(
        "%s: %d objects built at start frozen out of the collector (%.0f ms)", who, frozen, took
    )
    if pauses is not None:
        pauses.start()
    return frozen
