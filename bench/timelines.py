"""Request timelines in the benches: per request, each stage's ms after it started (the rooms'
marks, transport/timeline.py), taken over many requests; and a forward's launch on the host
with what the transfer threads did meanwhile (`Launch`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable


def stage_times(
    timelines: list[dict[str, float]], over: Callable[[Iterable[float]], float]
) -> dict[str, float]:
    """`over` (statistics.median, min, max) of each stage's ms, for the stages every request
    reached, earliest first."""
    if not timelines:
        return {}
    reached = [stage for stage in timelines[0] if all(stage in t for t in timelines)]
    times = {stage: float(over(t[stage] for t in timelines)) for stage in reached}
    return dict(sorted(times.items(), key=lambda item: item[1]))


class Launch:
    """One forward's launch on the host: its wall time, and the turns and CPU seconds of the
    transfer threads `loops` meanwhile."""

    def __init__(self, loops: list, began: float, turns: int, cpu_s: float) -> None:
        self.loops, self.began, self.turns, self.cpu_s = loops, began, turns, cpu_s
        self.ms = 0.0

    @classmethod
    def begin(cls, loops: list) -> Launch:
        turns, cpu_s = cls._threads(loops)
        return cls(loops, time.perf_counter(), turns, cpu_s)

    def end(self) -> Launch:
        self.ms = (time.perf_counter() - self.began) * 1e3
        turns, cpu_s = self._threads(self.loops)
        self.turns, self.cpu_s = turns - self.turns, cpu_s - self.cpu_s
        return self

    @staticmethod
    def _threads(loops: list) -> tuple[int, float]:
        return sum(loop.turns for loop in loops), sum(loop.cpu_seconds() for loop in loops)

    @staticmethod
    def medians(launches: list[Launch]) -> dict[str, float]:
        """Median launch ms, transfer-thread turns and CPU ms over `launches`."""
        return {
            "launch_ms": statistics.median(x.ms for x in launches),
            "launch_thread_turns": statistics.median(x.turns for x in launches),
            "launch_thread_cpu_ms": statistics.median(x.cpu_s for x in launches) * 1e3,
        }

    @staticmethod
    def table(runs: list[dict]) -> str:
        """One line per run (its `medians`)."""
        lines = [
            "one prompt's forward, launched on the host in (median ms), while this process's "
            "transfer threads took (turns, CPU ms):"
        ]
        width = max(len(run["name"]) for run in runs)
        for run in runs:
            lines.append(
                f"  {run['name']:{width}}{run['launch_ms']:8.2f} ms  "
                f"{run['launch_thread_turns']:5.1f} turns  "
                f"{run['launch_thread_cpu_ms']:6.2f} ms CPU"
            )
        return "\n".join(lines)
