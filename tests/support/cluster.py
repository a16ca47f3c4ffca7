"""Real deployments for the daemon tests: a YAML file with free ports, the daemons as child
processes (`kvferry serve`, through the launcher), clients, and a wait for idle."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from kvferry.daemon.cli.client import DaemonClient, ServerError
from kvferry.daemon.cli.launcher import Launcher
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.config import load
from ports import free_port
from support.metrics_sim import samples

FAST_TRANSFER = {
    "chunk_tokens": 8,
    "staging_bytes": 1 << 20,
    "bootstrap_timeout_s": 5,
    "heartbeat_interval_s": 0.2,
    "heartbeat_timeout_s": 2,
    "transfer_timeout_s": 30,
}


def prefill(name: str, **fields) -> dict:
    return {
        "role": "prefill",
        "name": name,
        "http_port": free_port(),
        "bootstrap_port": free_port(),
        "cache": {"page_size": 8, "num_pages": 64},
        "scheduler": {"prefill_chunk_tokens": 8, "max_batch_tokens": 24},
        "transfer": FAST_TRANSFER,
        **fields,
    }


def decode(name: str, prefills: list[dict], **fields) -> dict:
    return {
        "role": "decode",
        "name": name,
        "http_port": free_port(),
        "prefill": [f"tcp://127.0.0.1:{p['bootstrap_port']}" for p in prefills],
        "cache": {"page_size": 4, "num_pages": 256},
        "transfer": FAST_TRANSFER,
        "drain_timeout_s": 5,
        **fields,
    }


def write(
    tmp_path: Path, daemons: list[dict], model: dict | None = None, mps: str | None = None
) -> Path:
    """A deployment file of `daemons` (each with `model` unless it names one); `mps`: the
    file's top-level `mps` if given."""
    for daemon in daemons:
        daemon.setdefault("model", model or {})
    path = tmp_path / "deployment.yaml"
    top = {"mps": mps} if mps is not None else {}
    path.write_text(yaml.safe_dump(top | {"daemons": daemons}, sort_keys=False))
    load(path)  # a broken test file fails here, not in the daemons
    return path


@contextlib.contextmanager
def running(path: Path, expect_clean_exit: bool = True):
    """The deployment up; on the way out every daemon must stop cleanly (exit 0)."""
    launcher = Launcher.from_file(path, log=lambda line: None, stop_timeout=30)
    with launcher:
        launcher.start(timeout=180)
        yield launcher
        codes = launcher.stop()
    if expect_clean_exit:
        assert all(code == 0 for code in codes.values()), codes


def client(launcher: Launcher, name: str, timeout: float = 120) -> DaemonClient:
    return DaemonClient(next(c.url for c in launcher.children if c.name == name), timeout)


def generate(launcher: Launcher, name: str, prompt, max_tokens: int = 8, **kw):
    return client(launcher, name).complete(
        CompletionRequest(prompt=prompt, max_tokens=max_tokens, **kw)
    )


def failure(launcher: Launcher, name: str, prompt, **kw) -> ServerError:
    """The error a request is answered with (it must fail)."""
    try:
        result = generate(launcher, name, prompt, **kw)
    except ServerError as exc:
        return exc
    raise AssertionError(f"expected a failure, got {result}")


def wait_idle(launcher: Launcher, names: list[str] | None = None, timeout_s: float = 30) -> None:
    """Until every rank of the daemons holds no KV page, no ring byte and no room."""
    names = names or [c.name for c in launcher.children if c.returncode is None]
    deadline = time.monotonic() + timeout_s
    while True:
        busy = {name: _held(client(launcher, name).status()) for name in names}
        busy = {name: held for name, held in busy.items() if held}
        if not busy:
            return
        assert time.monotonic() < deadline, f"still holding resources: {busy}"
        time.sleep(0.2)


def _held(status: dict) -> list:
    held = []
    if status["requests"]["in_flight"]:
        held.append(f"{status['requests']['in_flight']} requests")
    for rank in status["ranks"]:
        if rank["kv_pages"]["used"] or rank["ring"]["used_bytes"]:
            held.append((rank["rank"], rank["kv_pages"], rank["ring"]))
        live = {s: n for s, n in rank["rooms"].items() if n and s not in ("Success", "Failed")}
        if live:
            held.append((rank["rank"], live))
    return held


def wait_for(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def fresh_loop_turns(launcher, name: str) -> dict[str, float]:
    """The turns of a snapshot the ranks sent just now (the first after a change): a rank's
    snapshot can be some time old when it has just been busy."""
    first = loop_turns(launcher, name)
    wait_for(lambda: loop_turns(launcher, name) != first, f"a fresh snapshot of {name}")
    return loop_turns(launcher, name)


def loop_turns(launcher, name: str, woken_by: str | None = None) -> dict[str, float]:
    """Each rank's transfer loop turns, or those `woken_by` a cause."""
    with urllib.request.urlopen(f"{client(launcher, name).url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    metric = "kvferry_transfer_loop_turns_total"
    if woken_by is not None:
        metric = "kvferry_transfer_loop_wakes_total"
    return {
        dict(labels)["rank"]: value
        for (family, labels), value in samples(text).items()
        if family == metric and dict(labels).get("cause", woken_by) == woken_by
    }
