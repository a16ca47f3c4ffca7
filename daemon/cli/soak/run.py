"""One soak: measure every process, run the load while the restarter restarts peers, measure
again, and lay the failures against the restarts."""

from __future__ import annotations

import asyncio
import time

import msgspec

from kvferry.daemon.cli.client import daemon_url
from kvferry.daemon.cli.launcher import Launcher
from kvferry.daemon.cli.soak.load import LoadSpec, run_load
from kvferry.daemon.cli.soak.peers import Restarter
from kvferry.daemon.cli.soak.processes import Processes
from kvferry.daemon.cli.soak.report import Bounds, SoakResult, summarize
from kvferry.daemon.server.config import Deployment


class SoakSpec(msgspec.Struct, frozen=True, kw_only=True):
    load: LoadSpec
    restart: tuple[str, ...] = ()  # daemons restarted in turn
    restart_every_s: float = 180.0
    ready_timeout_s: float = 300.0
    grace_s: float = 15.0  # after a restart's ready, failures still count as injected
    bounds: Bounds = Bounds()


class SoakError(Exception):
    """A soak that cannot run as asked; names what is wrong."""


def decode_url(deployment: Deployment) -> str:
    """Where the load goes: the first router if any, else the first decode daemon."""
    for member in [*deployment.routers, *deployment.daemons]:
        if member.role in ("router", "decode"):
            return daemon_url(member)
    raise SoakError("the deployment has no decode daemon nor router to send requests to")


def run_soak(deployment: Deployment, spec: SoakSpec, launcher: Launcher | None, log) -> SoakResult:
    """Soaks the running deployment; restarts need the `launcher` that started it."""
    names = {m.name for m in [*deployment.daemons, *deployment.routers]}
    unknown = [name for name in spec.restart if name not in names]
    if unknown:
        raise SoakError(f"--restart {', '.join(unknown)}: not in the deployment")
    if spec.restart and launcher is None:
        raise SoakError("restarts need a deployment this command starts (not --running)")
    processes = Processes(deployment)
    if not processes.look():
        raise SoakError("a daemon of the deployment does not answer /health with 200")
    restarter = Restarter(
        launcher,
        spec.restart,
        spec.restart_every_s,
        spec.ready_timeout_s,
        on_restart=processes.look,
        before_restart=processes.before_restart,
    )
    log(f"soak: {spec.load.duration_s:g} s of load on {decode_url(deployment)}")
    started = time.monotonic()
    restarter.start()
    try:
        outcomes = asyncio.run(run_load(decode_url(deployment), spec.load))
    finally:
        restarter.stop()
    seconds = time.monotonic() - started
    log(f"soak: {len(outcomes)} requests; waiting for the daemons to settle")
    return summarize(
        outcomes, restarter.restarts, processes.finish(), seconds, spec.grace_s, spec.bounds
    )
