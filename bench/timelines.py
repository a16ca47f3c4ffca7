"""Request timelines in the benches: per request, each stage's ms after it started (the rooms'
marks, transport/timeline.py), taken over many requests."""

from __future__ import annotations

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
