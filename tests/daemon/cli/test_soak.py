"""`kvferry soak`: failures are laid against the restarts (injected or not), growth past the
bounds and processes gone are problems; and a two-minute soak of a real pair (CPU), its prefill
daemon restarted during it, serves with no failure that a restart does not explain, with every
process's fds, threads and memory within the bounds and no process of an old incarnation left."""

import json

from click.testing import CliRunner

from kvferry.daemon.cli.fuzz.targets import ProcessFigures
from kvferry.daemon.cli.main import main
from kvferry.daemon.cli.soak.load import Outcome
from kvferry.daemon.cli.soak.peers import Restart
from kvferry.daemon.cli.soak.processes import ProcessRecord
from kvferry.daemon.cli.soak.report import Bounds, summarize
from support.cluster import FAST_TRANSFER, decode, prefill, write

MIB = 1 << 20


def _record(name, pid, start, end):
    return ProcessRecord(name=name, pid=pid, start=ProcessFigures(**start), end=end)


def test_failures_in_a_restart_window_are_injected_and_the_rest_are_not():
    restarts = [Restart("prefill-0", start=10.0, ready=20.0)]
    outcomes = [
        Outcome(0, 1, "ok"),
        Outcome(9, 11, "peer_lost"),  # across the stop
        Outcome(24, 25, "http_503"),  # within the grace after ready
        Outcome(30, 31, "http_503"),  # later: not the restart's doing
        Outcome(2, 3, "aborted"),
    ]
    figures = {"alive": True, "rss_bytes": 100 * MIB, "fds": 10, "threads": 5}
    record = _record("decode-0", 1, figures, ProcessFigures(**figures))
    result = summarize(outcomes, restarts, ([record], []), 40.0, 5.0, Bounds())
    assert (result.requests, result.served, result.aborted) == (5, 1, 1)
    assert result.injected == {"peer_lost": 1, "http_503": 1}
    assert result.other == {"http_503": 1}
    assert result.problems == ["1 http_503 failures not injected"]


def test_growth_past_the_bounds_and_lingering_processes_are_problems():
    start = {"alive": True, "rss_bytes": 100 * MIB, "fds": 10, "threads": 5}
    grown = [
        _record("a", 1, start, ProcessFigures(alive=True, rss_bytes=100 * MIB, fds=75, threads=5)),
        _record("b", 2, start, ProcessFigures(alive=True, rss_bytes=100 * MIB, fds=10, threads=9)),
        _record("c", 3, start, ProcessFigures(alive=True, rss_bytes=301 * MIB, fds=10, threads=5)),
        _record("d", 4, start, ProcessFigures(alive=False)),
    ]
    old = [_record("e", 5, start, ProcessFigures(**start))]
    old[0].alive_at_end = True
    bounds = Bounds(fds=64, threads=3, rss_bytes=200 * MIB)
    result = summarize([Outcome(0, 1, "ok")], [], (grown, old), 1.0, 5.0, bounds)
    assert result.problems == [
        "e (pid 5) outlived its restart",
        "a: fds 10 -> 75",
        "b: threads 5 -> 9",
        "c: RSS 100 -> 301",
        "d (pid 4) is gone",
    ]


def test_two_minute_soak_with_a_prefill_restart(tmp_path):
    transfer = {**FAST_TRANSFER, "heartbeat_timeout_s": 3}
    p = prefill("prefill-0", transfer=transfer)
    path = write(tmp_path, [p, decode("decode-0", [p], transfer=transfer)])
    out = tmp_path / "soak.json"
    args = ["soak", "--config", str(path), "--duration", "120", "--workers", "3"]
    args += ["--prompt-len", "1", "60", "--output-len", "1", "24", "--abort-ratio", "0.1"]
    args += ["--restart", "prefill-0", "--restart-every", "40", "--json", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    print(result.output)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["other"] == {} and figures["problems"] == []
    assert figures["served"] > 0 and figures["aborted"] > 0
    restarts = figures["restarts"]
    assert restarts and all(r["name"] == "prefill-0" and r["ready"] for r in restarts)
    names = {p["name"] for p in figures["processes"]}
    assert names == {"prefill-0", "prefill-0 rank 0", "decode-0", "decode-0 rank 0"}
    replaced = figures["replaced"]  # each old prefill-0 and its rank: gone, measured before
    assert len(replaced) == 2 * len(restarts) and not any(r["alive_at_end"] for r in replaced)
    assert all(r["end"]["alive"] for r in replaced)
