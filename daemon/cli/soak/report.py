"""What a soak found: requests served, failures by kind (injected or not), restarts, and each
process's resources at its start and the end; as a table, as JSON, and as the problems that make
`kvferry soak` exit 1."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import msgspec

from kvferry.daemon.cli.soak.load import Outcome
from kvferry.daemon.cli.soak.peers import Restart, injected
from kvferry.daemon.cli.soak.processes import ProcessRecord


class Bounds(msgspec.Struct, frozen=True, kw_only=True):
    """Growth a process may show between its start and the end."""

    fds: int = 64
    threads: int = 16
    rss_bytes: int = 200 << 20


class SoakResult(msgspec.Struct, kw_only=True):
    seconds: float
    requests: int
    served: int
    aborted: int  # by their client, on purpose
    injected: dict[str, int]  # failure kind -> count, overlapping a restart
    other: dict[str, int]  # failure kind -> count, not explained by a fault the soak made
    other_examples: list[str]
    restarts: list[Restart]
    processes: list[ProcessRecord]
    replaced: list[ProcessRecord]  # processes of a restarted daemon's earlier incarnation
    problems: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def summarize(
    outcomes: list[Outcome],
    restarts: list[Restart],
    processes: tuple[list[ProcessRecord], list[ProcessRecord]],
    seconds: float,
    grace_s: float,
    bounds: Bounds,
) -> SoakResult:
    failed = [o for o in outcomes if o.kind not in ("ok", "aborted")]
    fault = [o for o in failed if injected(o.start, o.end, restarts, grace_s)]
    other = [o for o in failed if o not in fault]
    result = SoakResult(
        seconds=seconds,
        requests=len(outcomes),
        served=sum(o.kind == "ok" for o in outcomes),
        aborted=sum(o.kind == "aborted" for o in outcomes),
        injected=dict(Counter(o.kind for o in fault)),
        other=dict(Counter(o.kind for o in other)),
        other_examples=[f"{o.kind}: {o.detail}" for o in other[:5]],
        restarts=restarts,
        processes=processes[0],
        replaced=processes[1],
    )
    result.problems = problems(result, bounds)
    return result


def problems(result: SoakResult, bounds: Bounds) -> list[str]:
    found = [f"{n} {kind} failures not injected" for kind, n in result.other.items()]
    found += [f"restart of {r.name}: {r.error}" for r in result.restarts if r.error]
    found += [
        f"{r.name} (pid {r.pid}) outlived its restart" for r in result.replaced if r.alive_at_end
    ]
    for record in result.processes + result.replaced:
        start, end = record.start, record.end
        if end is None or not end.alive:
            if record in result.replaced:
                continue  # gone before it could be measured: nothing to compare
            found.append(f"{record.name} (pid {record.pid}) is gone")
        elif end.fds - start.fds > bounds.fds:
            found.append(f"{record.name}: fds {start.fds} -> {end.fds}")
        elif end.threads - start.threads > bounds.threads:
            found.append(f"{record.name}: threads {start.threads} -> {end.threads}")
        elif end.rss_bytes - start.rss_bytes > bounds.rss_bytes:
            found.append(f"{record.name}: RSS {_mib(start.rss_bytes)} -> {_mib(end.rss_bytes)}")
    if not result.served:
        found.append("no request was served")
    return found


def table(result: SoakResult) -> str:
    lines = [
        f"{result.requests} requests in {result.seconds:.0f} s: {result.served} served, "
        f"{result.aborted} aborted by their client",
        f"failures injected: {_counts(result.injected)}; not injected: {_counts(result.other)}",
    ]
    for restart in result.restarts:
        took = "not ready" if restart.seconds is None else f"ready in {restart.seconds:.1f} s"
        lines.append(f"restart {restart.name}: {took}")
    lines.append(f"{'process':<28}{'pid':>8}  {'RSS MiB':>13}  {'fds':>9}  {'threads':>9}")
    for record in result.processes + [r for r in result.replaced if _alive(r)]:
        s, e = record.start, record.end
        rss = _arrow(_mib(s.rss_bytes), _mib(e.rss_bytes))
        lines.append(
            f"{_label(record, result):<28}{record.pid:>8}  {rss:>13}"
            f"  {_arrow(s.fds, e.fds):>9}  {_arrow(s.threads, e.threads):>9}"
        )
    return "\n".join(lines)


def write_json(result: SoakResult, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "none"


def _arrow(start, end) -> str:
    return f"{start}->{end}"


def _mib(n: int) -> int:
    return n >> 20


def _alive(record: ProcessRecord) -> bool:
    return record.end is not None and record.end.alive


def _label(record: ProcessRecord, result: SoakResult) -> str:
    """A replaced incarnation's figures end just before its restart."""
    return record.name + (" (old)" if record in result.replaced else "")
