"""What the fuzzer aims at and watches, found from a deployment file and the daemons' answers.

Sockets: each daemon's and router's HTTP port, each prefill daemon's bootstrap server, the
prefill ranks' control addresses (QueryPeers on the bootstrap server lists them) and the decode
ranks' (their /status entries). Processes: each daemon and router (pid from /health) and each
rank (pid from /status), measured from /proc: resident memory, open file descriptors, threads,
and whether alive.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import msgspec

from kvferry.daemon.cli.client import DaemonClient, daemon_url
from kvferry.daemon.cli.fuzz.values import Learned
from kvferry.daemon.server.config import Deployment
from kvferry.transport import curve
from kvferry.transport.control import request
from kvferry.transport.curve import CurveKeys
from kvferry.transport.messages import Codec, Peers, QueryPeers

RANKS_POLL_S = 0.2
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class FuzzedSocket:
    name: str  # "prefill-0 bootstrap", "decode-0 rank 0 control", "decode-0 http"
    kind: str  # bootstrap, prefill-control, decode-control, http
    address: str  # tcp://host:port, or the daemon's base URL


@dataclass(frozen=True)
class Process:
    name: str  # "prefill-0", "prefill-0 rank 1"
    pid: int


@dataclass
class Targets:
    sockets: list[FuzzedSocket] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)  # daemon name -> base URL
    learned: Learned = field(default_factory=Learned)
    keys: CurveKeys | None = None  # the deployment's CURVE pair: fuzz as a stranger and a member


class ProcessFigures(msgspec.Struct, kw_only=True):
    alive: bool
    rss_bytes: int = 0
    fds: int = 0
    threads: int = 0


def discover(deployment: Deployment, timeout_s: float = 10.0) -> Targets:
    """Every socket and process of the running deployment; ClientError if a daemon does not
    answer."""
    targets = Targets(keys=deployment_keys(deployment))
    for daemon in deployment.daemons:
        name, url = daemon.name or daemon.role, daemon_url(daemon)
        targets.urls[name] = url
        targets.sockets.append(FuzzedSocket(f"{name} http", "http", url))
        with DaemonClient(url, timeout_s) as client:
            targets.processes.append(Process(name, int(client.health().get("pid") or 0)))
            ranks = _ranks(client, daemon.tp, timeout_s)
        for rank in ranks:
            targets.processes.append(Process(f"{name} rank {rank['rank']}", rank.get("pid") or 0))
            if daemon.role == "decode" and rank.get("control_address"):
                where = f"{name} rank {rank['rank']} control"
                targets.sockets.append(
                    FuzzedSocket(where, "decode-control", rank["control_address"])
                )
        if daemon.role == "prefill":
            _add_prefill(targets, name, daemon, timeout_s)
        learned = targets.learned
        learned.max_frame_bytes = daemon.transfer.max_frame_bytes
        learned.max_prompt_tokens = daemon.prompt_limit
        learned.vocab_size = daemon.model.model_config().vocab_size
    for router in deployment.routers:  # an HTTP port in front of the decode daemons
        name, url = router.name or router.role, daemon_url(router)
        targets.urls[name] = url
        targets.sockets.append(FuzzedSocket(f"{name} http", "http", url))
        with DaemonClient(url, timeout_s) as client:
            targets.processes.append(Process(name, int(client.health().get("pid") or 0)))
    targets.processes = [p for p in targets.processes if p.pid]
    return targets


def _ranks(client: DaemonClient, tp: int, timeout_s: float) -> list[dict]:
    """The /status entries of every rank; a daemon that just became ready may not have
    heard from all of its ranks yet (they report twice a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ranks = client.status().get("ranks") or []
        if len(ranks) >= tp or time.monotonic() > deadline:
            return ranks
        time.sleep(RANKS_POLL_S)


def _add_prefill(targets: Targets, name: str, daemon, timeout_s: float) -> None:
    host = _LOOPBACK.get(daemon.host, daemon.host)
    bootstrap = f"tcp://{host}:{daemon.bootstrap_port}"
    targets.sockets.append(FuzzedSocket(f"{name} bootstrap", "bootstrap", bootstrap))
    context = curve.context(targets.keys)
    try:
        reply = request(context, Codec(1 << 30), bootstrap, QueryPeers(), timeout_s)
    finally:
        curve.close(context)
    if not isinstance(reply, Peers):
        raise RuntimeError(f"{name}: bootstrap server {bootstrap} answered {reply!r}")
    targets.learned.ranks.extend(reply.ranks)
    for info in reply.ranks:
        where = f"{name} rank {info.layout.tp_rank} control"
        targets.sockets.append(FuzzedSocket(where, "prefill-control", info.control_address))


def deployment_keys(deployment: Deployment) -> CurveKeys | None:
    """The CURVE pair of the deployment's daemons (one file for all), None without one."""
    files = {d.security.curve_key_file for d in deployment.daemons} - {None}
    if len(files) > 1:
        raise ValueError(f"the daemons name different CURVE key files: {sorted(files)}")
    return curve.load(files.pop()) if files else None


def measure(pid: int) -> ProcessFigures:
    """From /proc: resident memory, open fds and threads; alive=False for a process that is
    gone or a zombie."""
    try:
        status = _status_fields(pid)
        if status.get("State", "").startswith(("Z", "X")):
            return ProcessFigures(alive=False)
        return ProcessFigures(
            alive=True,
            rss_bytes=int(status.get("VmRSS", "0 kB").split()[0]) * 1024,
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            threads=int(status.get("Threads", "0")),
        )
    except (FileNotFoundError, ProcessLookupError):
        return ProcessFigures(alive=False)


def _status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


# metric names of frames refused as malformed or unexpected, and of handlings that raised (a bug
# each: the server contained it and kept serving)
BAD_FRAMES, INTERNAL_ERRORS = ("bad_frames",), ("internal_errors", "failed_frames")


def summed(metrics_text: str, parts: tuple[str, ...]) -> int:
    """The sum of every sample whose metric name contains one of `parts`, in a Prometheus text
    exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#") or not any(part in line.split(" ", 1)[0] for part in parts):
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
    return int(total)
