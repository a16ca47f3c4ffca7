"""The lines `kvferry bench` prints under its table: each point's first wave, the daemons'
memory and their garbage collector's pauses."""

from __future__ import annotations

from kvferry.daemon.cli.bench.report import Point, num, point_name


def first_wave_lines(points: list[Point]) -> list[str]:
    """Per point whose first wave the latency figures leave out: its size and TTFT."""
    return [
        f"{point_name(p.mode, p.value)}: the first {p.first_wave} requests, sent at once, are left "
        f"out of the latencies above; their TTFT p50 {num(p.first_wave_ttft_ms.median)} ms, "
        f"p90 {num(p.first_wave_ttft_ms.p90)} ms"
        for p in points
        if p.first_wave
    ]


def rss_lines(points: list[Point]) -> list[str]:
    """Per point with RSS figures: each daemon's process RSS before -> after, in MiB."""
    lines = []
    for p in points:
        names = sorted(p.rss_before_bytes.keys() | p.rss_after_bytes.keys())
        if not names:
            continue
        before, after = p.rss_before_bytes, p.rss_after_bytes
        shown = [f"{n} {_mib(before.get(n))} -> {_mib(after.get(n))}" for n in names]
        lines.append(f"daemons' RSS MiB, {point_name(p.mode, p.value)}: {', '.join(shown)}")
    return lines


def gc_lines(points: list[Point]) -> list[str]:
    """Per point where a process paused for its garbage collector: ms in all and full passes,
    by daemon and process (every thread of a process waits while it collects)."""
    lines = []
    for p in points:
        paused = sorted(p.gc_pause_ms.items(), key=lambda item: -item[1])
        if paused:
            shown = [f"{w} {ms:.1f} ({p.gc_full_passes.get(w, 0):.0f})" for w, ms in paused]
            lines.append(
                f"GC pauses, {point_name(p.mode, p.value)}, ms in all (full passes): "
                + ", ".join(shown)
            )
    return lines


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**20:.1f}"
