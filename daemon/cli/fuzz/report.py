"""The fuzzer's figures as text tables, and as JSON."""

from __future__ import annotations

from pathlib import Path

import msgspec

from kvferry.daemon.cli.fuzz.run import FuzzResult


def table(result: FuzzResult) -> str:
    lines = [f"{'socket':<32} {'frames':>8} {'MiB':>8} {'s':>7} {'frames/s':>9}  outcomes"]
    for run in result.sockets:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes.items())) or "-"
        lines.append(
            f"{run.name:<32} {run.frames:>8} {run.bytes / 2**20:>8.1f} {run.seconds:>7.1f} "
            f"{run.frames_per_s:>9.0f}  {outcomes}"
        )
    total = sum(run.frames for run in result.sockets)
    lines += ["", f"{total} frames in all (seed {result.spec.seed})", ""]
    lines.append(
        f"{'process':<24} {'pid':>8} {'alive':>6} {'RSS MiB':>15} {'fds':>11} {'threads':>9}"
    )
    for p in result.processes:
        after = p.after or p.before
        lines.append(
            f"{p.name:<24} {p.pid:>8} {'yes' if after.alive else 'DEAD':>6} "
            f"{_mib(p.before.rss_bytes):>6} -> {_mib(after.rss_bytes):>5} "
            f"{p.before.fds:>4} -> {after.fds:>4} {p.before.threads:>3} -> {after.threads:>3}"
        )
    lines.append("")
    for name, status in result.health.items():
        frames = result.bad_frames.get(name, [-1, -1])
        errors = result.internal_errors.get(name, [-1, -1])
        lines.append(
            f"{name}: /health {status}; bad frames counted {frames[0]} -> {frames[1]}; "
            f"internal errors {errors[0]} -> {errors[1]}"
        )
    same = result.completion_after == result.completion_before
    lines.append(
        f"completion before {result.completion_before}, after {result.completion_after}"
        f" ({'equal' if same else 'DIFFERENT'})"
    )
    return "\n".join(lines)


def problems(result: FuzzResult) -> str:
    if not result.problems:
        return "the deployment survived: every process alive, healthy, same completion"
    return "\n".join(["PROBLEMS:", *(f"  - {problem}" for problem in result.problems)])


def families(result: FuzzResult) -> str:
    """Frames sent per family, over every socket."""
    counts: dict[str, int] = {}
    for run in result.sockets:
        for family, count in run.families.items():
            counts[family] = counts.get(family, 0) + count
    return "frame families: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def write_json(result: FuzzResult, path: str | Path) -> None:
    data = msgspec.to_builtins(result)
    for run, raw in zip(result.sockets, data["sockets"], strict=True):
        raw["frames_per_s"] = round(run.frames_per_s, 1)
    data["ok"] = result.ok
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=1) + b"\n")


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}"
