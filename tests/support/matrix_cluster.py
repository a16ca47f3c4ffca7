"""The fault matrix's deployment: one prefill and one decode daemon of one rank each, served with
the stage holds of held_stages.py, short heartbeats and a short request deadline; and the pieces a
cell needs: the pids of a daemon and its ranks, the faults, and the recovery."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from kvferry.daemon.cli.launcher import Launcher
from kvferry.daemon.server.config import load
from support.cluster import client, decode, prefill, wait_for, write
from support.held_stages import serve_command

TESTS_DIR = str(Path(__file__).resolve().parents[1])
HEARTBEAT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 15.0  # a request held for good ends here
DRAIN_S = 5  # what a stopping (restarted) daemon gives its requests in flight
TRANSFER = {
    "chunk_tokens": 8,
    "staging_bytes": 1 << 20,
    "bootstrap_timeout_s": 30,  # longer than a request: a held room ends at its deadline
    "heartbeat_interval_s": 0.2,
    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
    "transfer_timeout_s": 30,
}


@contextlib.contextmanager
def matrix_cluster(tmp_path: Path, unwatched: bool = False):
    """`unwatched`: ranks do not watch their control connections (held_stages.UNWATCHED)."""
    p = prefill("prefill-0", transfer=TRANSFER, drain_timeout_s=DRAIN_S)
    d = decode(
        "decode-0",
        [p],
        transfer=TRANSFER,
        scheduler={"request_timeout_s": REQUEST_TIMEOUT_S},
    )
    path = write(tmp_path, [p, d])
    gate = str(tmp_path / "decode-gate")
    command = serve_command(TESTS_DIR, str(path), gate, unwatched)
    launcher = Launcher(load(path), command=command, log=lambda line: None)
    launcher.gate = Path(gate)
    with launcher:
        launcher.start(timeout=180)
        yield launcher


def daemon_pid(launcher: Launcher, name: str) -> int:
    return next(c for c in launcher.children if c.name == name).process.pid


def rank_pid(launcher: Launcher, name: str) -> int:
    """Its one rank's pid, once the rank has reported (twice a second)."""
    daemon = client(launcher, name)
    wait_for(lambda: daemon.status()["ranks"], f"{name}'s rank to report")
    (rank,) = daemon.status()["ranks"]
    return rank["pid"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:\tZ") for line in status)
    except FileNotFoundError:
        return False


def inject(launcher: Launcher, name: str, pid: int, fault: str) -> None:
    """SIGKILL; SIGSTOP for well past the heartbeat timeout, then SIGCONT; or the daemon
    restarted on its own addresses."""
    if fault == "kill":
        os.kill(pid, signal.SIGKILL)
    elif fault == "stop":
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(2 * HEARTBEAT_TIMEOUT_S + 1)  # the fault's length, not a wait for a state
        finally:
            os.kill(pid, signal.SIGCONT)
    else:
        assert fault == "restart", fault
        launcher.restart(name, 180)


def recover(launcher: Launcher) -> list[str]:
    """Restarts every daemon that has exited; their names."""
    gone = [c.name for c in launcher.children if c.returncode is not None]
    for name in gone:
        launcher.restart(name, 180)
    return gone
