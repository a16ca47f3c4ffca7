"""Where a request's time to first token goes: the daemons' timelines (stage -> seconds after
the decode daemon got the request, transport/timeline.py) turned into each stage's share of
TTFT, summed up over a point's requests as median and p90, and written per request by
`kvferry bench --trace`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

FIRST_TOKEN = "first_token_out"
# the HTTP front's own marks (completions.py): the request's headers in (before `received`, so
# negative), and its first chunk handed to the socket (after the first token out)
HTTP_IN, FIRST_CHUNK = "http_in", "first_chunk_sent"
# what lies outside the daemons, split at those marks (`outside_parts`): key -> its name shown
OUTSIDE_PARTS = {"front_in": "front in", "front_out": "front out", "client": "client and wire"}


def stage_shares(timelines: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """stage -> {"p50", "p90"} of its share of TTFT, and {"p50_ms", "p90_ms"} of its length.
    A stage lasts from the stage before it (in that request's order) to its own end; stages
    after the first token are left out."""
    lengths: dict[str, list[tuple[float, float]]] = {}
    for timeline in timelines:
        ttft = timeline.get(FIRST_TOKEN)
        if not ttft or ttft <= 0:
            continue
        ordered = sorted((at, s) for s, at in timeline.items() if at <= ttft and s != HTTP_IN)
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


def outside_parts(records) -> dict[str, list[float]]:
    """`outside_daemons` in three, per request with the front's marks (seconds): the front's
    way in (headers in -> the decode daemon has the request), its way out (first token out ->
    its chunk handed to the socket), and the rest: the client's own time and the wire, both ways."""
    parts: dict[str, list[float]] = {key: [] for key in OUTSIDE_PARTS}
    for r in records:
        t = r.timeline or {}
        if r.ttft_s is None or HTTP_IN not in t or FIRST_CHUNK not in t:
            continue
        parts["front_in"].append(-t[HTTP_IN])
        parts["front_out"].append(t[FIRST_CHUNK] - t[FIRST_TOKEN])
        parts["client"].append(r.ttft_s - (t[FIRST_CHUNK] - t[HTTP_IN]))
    return parts


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
        parts = point.ttft_outside_parts_ms
        if parts:
            shown = ", ".join(f"{OUTSIDE_PARTS[k]} {v.median:.2f}" for k, v in parts.items())
            lines.append(f"    of which, p50 ms: {shown}")
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
