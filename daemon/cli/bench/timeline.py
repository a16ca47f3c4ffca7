"""Where a request's time to first token goes: the daemons' timelines (stage -> seconds after
the decode daemon got the request, transport/timeline.py) turned into each stage's share of
TTFT, summed up over a point's requests as median and p90, and written per request by
`kvferry bench --trace`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

FIRST_TOKEN = "first_token_out"


def stage_shares(timelines: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """stage -> {"p50", "p90"} of its share of TTFT, and {"p50_ms", "p90_ms"} of its length.
    A stage lasts from the stage before it (in that request's order) to its own end; stages
    after the first token are left out."""
    lengths: dict[str, list[tuple[float, float]]] = {}
    for timeline in timelines:
        ttft = timeline.get(FIRST_TOKEN)
        if not ttft or ttft <= 0:
            continue
        ordered = sorted(((at, stage) for stage, at in timeline.items() if at <= ttft))
        previous = 0.0
        for at, stage in ordered:
            lengths.setdefault(stage, []).append((at - previous, (at - previous) / ttft))
            previous = at
    return {stage: _summary(values) for stage, values in _in_order(lengths, timelines).items()}


def outside_daemons(records) -> list[float]:
    """Per request with a TTFT and a timeline: the client's TTFT less the decode daemon's
    first token out (seconds), what the HTTP front and the client add."""
    return [
        r.ttft_s - r.timeline[FIRST_TOKEN]
        for r in records
        if r.ttft_s is not None and r.timeline and FIRST_TOKEN in r.timeline
    ]


def _in_order(lengths: dict, timelines: list[dict[str, float]]) -> dict:
    """The stages in the order of their median end time."""
    ends = {s: statistics.median(t[s] for t in timelines if s in t) for s in lengths}
    return {stage: lengths[stage] for stage in sorted(lengths, key=ends.__getitem__)}


def _summary(values: list[tuple[float, float]]) -> dict[str, float]:
    seconds, shares = sorted(v[0] for v in values), sorted(v[1] for v in values)
    return {
        "p50": _pct(shares, 0.5),
        "p90": _pct(shares, 0.9),
        "p50_ms": _pct(seconds, 0.5) * 1e3,
        "p90_ms": _pct(seconds, 0.9) * 1e3,
    }


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def stage_table(points) -> str:
    """One block per point: each stage's median and p90 length and share of TTFT."""
    lines = []
    for point in points:
        if not point.stages:
            continue
        name = f"c={point.value:g}" if point.mode == "concurrency" else f"rate={point.value:g}/s"
        lines.append(f"where TTFT goes, {name} (stage ends; length and share of TTFT):")
        lines.append(f"  {'stage':24}{'p50 ms':>9}{'p90 ms':>9}{'p50':>7}{'p90':>7}")
        for stage, s in point.stages.items():
            lines.append(
                f"  {stage:24}{s['p50_ms']:9.2f}{s['p90_ms']:9.2f}{s['p50']:7.0%}{s['p90']:7.0%}"
            )
        outside = point.ttft_outside_ms
        if outside.median is not None:
            lines.append(
                f"  {'outside the daemons':24}{outside.median:9.2f}{outside.p90:9.2f}"
                "  (client TTFT less first_token_out: HTTP front and client)"
            )
    return "\n".join(lines)


def write_trace(result, path: str | Path) -> None:
    """One JSON line per measured request: its point, index, TTFT and timeline."""
    with open(path, "w") as out:
        for point in result.points:
            for record in point.requests:
                line = {
                    "point": point.value,
                    "mode": point.mode,
                    "index": record.index,
                    "ok": record.ok,
                    "ttft_s": record.ttft_s,
                    "latency_s": record.latency_s,
                    "timeline": record.timeline,
                }
                out.write(json.dumps(line) + "\n")
