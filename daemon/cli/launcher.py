"""Runs a deployment: one `kvferry serve` child process per daemon, one `kvferry router` per
router.

Prefill daemons start first; decode daemons start once every prefill daemon answers /health,
because they register with prefill at start-up; routers start once every decode daemon answers.
Stopping goes the other way: routers first (they send requests to decode), then decode (it
holds rooms on prefill), then prefill. Children run in their own session, so a terminal's Ctrl-C
reaches only the launcher, which then stops them in that order. With the file's `mps:` on (or
auto, where it can), a private CUDA MPS server is started before the first child and stopped
after the last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvferry.daemon.cli.client import DaemonClient, daemon_url
from kvferry.daemon.cli.mps import NoMPS, mps_server
from kvferry.daemon.server.config import ConfigError, DaemonConfig, Deployment, RouterConfig, load

CommandBuilder = Callable[[DaemonConfig | RouterConfig], Sequence[str]]

START_ORDER = ("prefill", "decode", "router")
_PROBE_TIMEOUT_S = 1.0  # one /health request while waiting for readiness
_REAP_AFTER_KILL_S = 10.0


class LaunchError(RuntimeError):
    """A daemon that did not come up, or a stop requested while starting."""


def serve_command(config_path: str | Path, log_level: str | None = None) -> CommandBuilder:
    """The command line that serves one daemon (or router) of the file at `config_path`."""

    def build(daemon: DaemonConfig | RouterConfig) -> list[str]:
        verb = "router" if daemon.role == "router" else "serve"
        command = [sys.executable, "-m", "kvferry.daemon.cli.main", verb]
        command += ["--config", str(config_path), "--name", daemon.name]
        return command + (["--log-level", log_level] if log_level else [])

    return build


def describe_exit(code: int | None) -> str:
    """`exited 0`, `exited with code 3`, `killed by SIGKILL`, `still running`."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "exited 0" if code == 0 else f"exited with code {code}"


@dataclass
class Child:
    """One daemon (or router) of the deployment and, once started, its process."""

    daemon: DaemonConfig | RouterConfig
    url: str
    process: subprocess.Popen | None = None
    started_at: float = 0.0  # time.monotonic() at spawn

    @property
    def name(self) -> str:
        return self.daemon.name

    @property
    def role(self) -> str:
        return self.daemon.role

    @property
    def returncode(self) -> int | None:
        """None while running (or never started)."""
        return None if self.process is None else self.process.poll()


class Launcher:
    """Starts, watches and stops the daemons of one deployment; a context manager that stops
    whatever is still running on the way out."""

    def __init__(
        self,
        deployment: Deployment,
        *,
        command: CommandBuilder,
        log: Callable[[str], None] | None = None,
        stop_timeout: float = 30.0,
        poll_s: float = 0.1,
    ) -> None:
        check_runnable(deployment)
        members = [*deployment.daemons, *deployment.routers]
        self.children = [Child(daemon, daemon_url(daemon)) for daemon in members]
        self.stop_timeout = stop_timeout
        self._mps = deployment.mps
        self._on_gpu = any(daemon.device == "cuda" for daemon in deployment.daemons)
        self._env: dict[str, str] | None = None  # the children's: None, the launcher's own
        self._resources = contextlib.ExitStack()  # the MPS server, if one runs
        self._command = command
        self._log = log or _to_stderr
        self._poll_s = poll_s
        # A plain flag, not a threading.Event: request_stop runs in signal handlers, which must
        # not take a lock that the code they interrupted may hold.
        self._stop_requested = False

    @classmethod
    def from_file(cls, path: str | Path, *, log_level: str | None = None, **kwargs) -> Launcher:
        """The deployment in `path`, each daemon served by `kvferry serve` from that file."""
        return cls(load(path), command=serve_command(path, log_level), **kwargs)

    def start(self, timeout: float = 120.0) -> None:
        """Prefill daemons, then decode, then routers; each group must answer /health within
        `timeout` s."""
        assert all(child.process is None for child in self.children), "start() runs once"
        self._env = self._start_mps()
        for role in START_ORDER:
            group = [child for child in self.children if child.role == role]
            for child in group:
                self._spawn(child)
            self.wait_ready(group, timeout)

    def wait_ready(self, children: Sequence[Child], timeout: float) -> None:
        """Until every child answers GET /health with 200; LaunchError if one exits first, the
        timeout passes or a stop is requested."""
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in pending:
                self._check_starting(child)
            pending = [child for child in pending if not self._ready(child)]
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{child.name} ({child.url})" for child in pending)
                raise LaunchError(f"not ready after {timeout:g} s: {names}")
            if pending:
                time.sleep(self._poll_s)

    def request_stop(self) -> None:
        """Makes wait() return and wait_ready() give up; safe to call from a signal handler."""
        self._stop_requested = True

    def wait(self, timeout: float | None = None) -> Child | None:
        """Until a child exits on its own (returned), or a stop is requested or `timeout` s pass
        (None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop_requested:
            for child in self.children:
                if child.returncode is not None:
                    return child
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(self._poll_s)
        return None

    def stop(self, timeout: float | None = None) -> dict[str, int | None]:
        """SIGTERM to routers, then decode daemons, then prefill; a group still running after
        `timeout` s (default: stop_timeout) gets SIGKILL. Returns each started one's exit code."""
        timeout = self.stop_timeout if timeout is None else timeout
        codes: dict[str, int | None] = {}
        for role in reversed(START_ORDER):
            group = [c for c in self.children if c.role == role and c.process is not None]
            for child in group:
                if child.returncode is None:
                    self._log(f"stopping {child.name}")
                    child.process.terminate()
            deadline = time.monotonic() + timeout
            for child in group:
                codes[child.name] = self._reap(child, deadline, timeout)
        self._resources.close()  # the MPS server, once its clients are gone
        return codes

    def restart(self, name: str, timeout: float) -> Child:
        """Stops the child `name` (SIGTERM; SIGKILL after stop_timeout) and starts it again on
        the same addresses; returns once it answers /health (LaunchError if it does not within
        `timeout` s)."""
        child = next(c for c in self.children if c.name == name)
        if child.returncode is None:
            self._log(f"restarting {child.name}")
            child.process.terminate()
            self._reap(child, time.monotonic() + self.stop_timeout, self.stop_timeout)
        self._spawn(child)
        self.wait_ready([child], timeout)
        return child

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info) -> None:
        if any(child.returncode is None for child in self.children if child.process):
            self.stop()
        self._resources.close()

    def _start_mps(self) -> dict[str, str] | None:
        """The children's environment on a private MPS server, as `mps:` asks; None: the
        launcher's own."""
        if self._mps == "off" or (self._mps == "auto" and not self._on_gpu):
            return None
        pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
        if pipes:  # the launcher runs on an MPS server already: the daemons join it
            self._log(f"daemons on the MPS server of CUDA_MPS_PIPE_DIRECTORY={pipes}")
            return None
        try:
            env = self._resources.enter_context(mps_server())
        except NoMPS as exc:
            if self._mps == "on":
                raise LaunchError(f"mps: on, but no MPS server could start: {exc}") from None
            self._log(f"mps: auto: no MPS server ({exc}); daemons sharing a GPU take turns on it")
            return None
        self._log(f"daemons on a private CUDA MPS server ({env['CUDA_MPS_PIPE_DIRECTORY']})")
        return env

    def _spawn(self, child: Child) -> None:
        command = list(self._command(child.daemon))
        try:
            child.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, start_new_session=True, env=self._env
            )
        except OSError as exc:
            raise LaunchError(f"{child.name}: cannot run {command[0]}: {exc}") from None
        child.started_at = time.monotonic()
        self._log(f"{child.name} starting ({child.role}, pid {child.process.pid})")

    def _check_starting(self, child: Child) -> None:
        if self._stop_requested:
            raise LaunchError(f"stopped while {child.name} was starting")
        if child.returncode is not None:
            raise LaunchError(f"{child.name} {describe_exit(child.returncode)} before it was ready")

    def _ready(self, child: Child) -> bool:
        with DaemonClient(child.url, timeout=_PROBE_TIMEOUT_S) as client:
            pid = client.ready_pid()
        if pid is None:
            return False
        if pid not in (0, child.process.pid):
            raise LaunchError(
                f"{child.name}: {child.url} is answered by another daemon (pid {pid}); is an "
                "earlier deployment still running?"
            )
        elapsed = time.monotonic() - child.started_at
        self._log(f"{child.name} ready on {child.url} ({elapsed:.1f} s)")
        return True

    def _reap(self, child: Child, deadline: float, timeout: float) -> int | None:
        try:
            code = child.process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            self._log(f"{child.name} still running {timeout:g} s after SIGTERM; sending SIGKILL")
            child.process.kill()
            try:
                code = child.process.wait(timeout=_REAP_AFTER_KILL_S)
            except subprocess.TimeoutExpired:
                code = None
        self._log(f"{child.name} {describe_exit(code)}")
        return code


def check_runnable(deployment: Deployment) -> None:
    """What running a whole deployment needs beyond a valid file: daemons, each daemon and
    router with a unique name and a fixed http_port (readiness is checked on it)."""
    if not deployment.daemons:
        raise ConfigError("the deployment lists no daemons")
    members = [(f"daemons[{i}]", d) for i, d in enumerate(deployment.daemons)]
    members += [(f"routers[{i}]", r) for i, r in enumerate(deployment.routers)]
    names = [daemon.name for _, daemon in members]
    for where, daemon in members:
        if not daemon.name:
            raise ConfigError(
                f"{where} ({daemon.role}) has no name; running a deployment needs a "
                "unique `name` on every daemon and router"
            )
        if names.count(daemon.name) > 1:
            raise ConfigError(f"{where}: name {daemon.name!r} is used more than once")
        if daemon.http_port == 0:
            raise ConfigError(
                f"{daemon.name}: http_port is 0 (any free port), but the launcher needs to know "
                "the port to check /health; set a fixed http_port"
            )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
