"""The launcher and `kvferry up`, with stub daemon processes."""

import os
import signal
import sys
from pathlib import Path

import pytest

from kvferry.daemon.cli import launcher as launcher_module
from kvferry.daemon.cli import main as cli_module
from kvferry.daemon.cli.launcher import Launcher, LaunchError
from kvferry.daemon.server.config import ConfigError, parse
from ports import free_ports
from support.cli_sim import invoke, one_error_line, two_daemons, write_yaml

# --- launcher and `up`, with stub daemon processes -------------------------------------------

# A stand-in daemon: answers /health with 503 twice, then 200; notes what happens in a shared log.
STUB_DAEMON = """
import http.server, os, signal, sys, threading, time
name, port, log, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {name}\\n")

def on_sigterm(signum, frame):
    time.sleep(0.3 if mode == "slow-stop" else 0)
    note("stop")
    os._exit(0)

note("start")
if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
    note("on-mps")
if mode == "crash":
    sys.exit(5)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_sigterm)
probes = []

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        probes.append(self.path)
        ready = mode != "never" and len(probes) > 2
        if ready and len(probes) == 3:
            note("ready")
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if ready and mode == "die":
            threading.Timer(0.2, os._exit, (3,)).start()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


class _Stubs:
    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "stub_daemon.py"
        self.script.write_text(STUB_DAEMON)
        self.log = tmp_path / "events.log"
        self.modes: dict[str, str] = {}
        self.raw = two_daemons(*free_ports(2))
        self.deployment = parse(self.raw)
        self.config_path = write_yaml(tmp_path, self.raw)

    def command(self, daemon) -> list[str]:
        mode = self.modes.get(daemon.name, "ok")
        port, log = str(daemon.http_port), str(self.log)
        return [sys.executable, str(self.script), daemon.name, port, log, mode]

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def launcher(self, lines: list[str], **changes) -> Launcher:
        deployment = parse({**self.raw, **changes}) if changes else self.deployment
        return Launcher(deployment, command=self.command, log=lines.append, poll_s=0.05)


@pytest.fixture
def stubs(tmp_path):
    return _Stubs(tmp_path)


def test_launcher_starts_prefill_first_and_stops_it_last(stubs):
    lines = []
    stubs.modes["decode-0"] = "slow-stop"  # stopping both at once would log prefill first
    with stubs.launcher(lines) as launcher:
        launcher.start(timeout=30)
        assert stubs.events() == [
            "start prefill-0",
            "ready prefill-0",
            "start decode-0",
            "ready decode-0",
        ]
        assert launcher.wait(timeout=0.1) is None  # all running
        codes = launcher.stop(timeout=10)
    assert codes == {"decode-0": 0, "prefill-0": 0}
    assert stubs.events()[-2:] == ["stop decode-0", "stop prefill-0"]
    url = launcher.children[0].url
    assert any(line.startswith(f"prefill-0 ready on {url} (") for line in lines)


def test_launcher_reports_a_daemon_that_dies(stubs):
    stubs.modes["decode-0"] = "die"
    with stubs.launcher([]) as launcher:
        launcher.start(timeout=30)
        died = launcher.wait(timeout=30)
        assert died is not None and (died.name, died.returncode) == ("decode-0", 3)
        codes = launcher.stop(timeout=10)
    assert codes == {"decode-0": 3, "prefill-0": 0}


def test_launcher_kills_a_daemon_that_ignores_sigterm(stubs):
    stubs.modes["prefill-0"] = "stubborn"
    with stubs.launcher([]) as launcher:
        launcher.start(timeout=30)
        codes = launcher.stop(timeout=0.3)
    assert codes == {"decode-0": 0, "prefill-0": -signal.SIGKILL}


@pytest.mark.parametrize(
    "mode, fragment",
    [("crash", "prefill-0 exited with code 5 before it was ready"), ("never", "not ready after")],
)
def test_launcher_start_failures(stubs, mode, fragment):
    stubs.modes["prefill-0"] = mode
    with pytest.raises(LaunchError, match=fragment), stubs.launcher([]) as launcher:
        launcher.start(timeout=1)
    assert "start decode-0" not in stubs.events()
    assert all(child.returncode is not None for child in launcher.children if child.process)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"name": ""}, "has no name"),
        ({"name": "decode-0"}, "used more than once"),
        ({"http_port": 0}, "needs to know the port"),
        (None, "no daemons"),
    ],
)
def test_deployments_the_launcher_refuses(tmp_path, change, fragment):
    raw = two_daemons(*free_ports(2))
    if change is None:
        raw["daemons"] = []
    else:
        raw["daemons"][0].update(change)
    with pytest.raises(ConfigError, match=fragment):
        Launcher(parse(raw), command=lambda daemon: ["true"])
    assert fragment in one_error_line(invoke("up", "--config", write_yaml(tmp_path, raw)))


def test_up_runs_until_sigterm(stubs, monkeypatch):
    monkeypatch.setattr(launcher_module, "serve_command", lambda path, log_level: stubs.command)
    note = cli_module.note

    def note_and_stop(line):  # stands in for the user's Ctrl-C once everything is up
        note(line)
        if line.startswith("all daemons ready"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli_module, "note", note_and_stop)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = invoke("up", "--config", stubs.config_path)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert result.exit_code == 0, result.output
    urls = [f"http://127.0.0.1:{d['http_port']}" for d in stubs.raw["daemons"]]
    assert result.stdout == f"prefill-0\tprefill\t{urls[0]}\ndecode-0\tdecode\t{urls[1]}\n"
    assert stubs.events()[-2:] == ["stop decode-0", "stop prefill-0"]


def test_up_exits_1_when_a_daemon_dies(stubs, monkeypatch):
    monkeypatch.setattr(launcher_module, "serve_command", lambda path, log_level: stubs.command)
    stubs.modes["decode-0"] = "die"
    result = invoke("up", "--config", stubs.config_path)
    assert result.exit_code == 1
    assert "decode-0 exited with code 3 on its own; stopping the others" in result.stderr
    assert "prefill-0 exited 0" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: decode-0 exited with code 3 while running"
    )


# --- `mps:` a private CUDA MPS server around the daemons -------------------------------------

# A stand-in for nvidia-cuda-mps-control: `-d` starts "the daemon", a `quit` line on stdin
# stops it; each call noted in the stub daemons' log, with the pipe folder it was given.
STUB_CONTROL = """#!/bin/sh
if [ "$1" = "-d" ]; then
    echo "mps-start $CUDA_MPS_PIPE_DIRECTORY" >> {log}
else
    read line
    echo "mps-$line $CUDA_MPS_PIPE_DIRECTORY" >> {log}
fi
"""


@pytest.fixture
def mps_control(stubs, tmp_path, monkeypatch):
    """The stand-in nvidia-cuda-mps-control first on the PATH, outside any MPS environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(STUB_CONTROL.format(log=stubs.log))
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)


def test_mps_on_runs_the_daemons_on_a_private_server_stopped_after_them(stubs, mps_control):
    lines = []
    with stubs.launcher(lines, mps="on") as launcher:
        launcher.start(timeout=30)
        launcher.stop(timeout=10)
    events = stubs.events()
    pipes = events[0].split()[1]
    assert events[0] == f"mps-start {pipes}" and events[-1] == f"mps-quit {pipes}"
    assert [e for e in events[1:-1] if not e.startswith(("ready", "stop"))] == [
        "start prefill-0", "on-mps prefill-0", "start decode-0", "on-mps decode-0"
    ]  # fmt: skip
    assert not Path(pipes).exists()  # the private folders go with the server
    assert any(pipes in line for line in lines)


def test_mps_server_stops_when_a_daemon_fails_to_start(stubs, mps_control):
    stubs.modes["prefill-0"] = "crash"
    with (
        pytest.raises(LaunchError, match="exited with code 5"),
        stubs.launcher([], mps="on") as launcher,
    ):
        launcher.start(timeout=30)
    events = stubs.events()
    assert events[0].startswith("mps-start ") and events[-1].startswith("mps-quit ")
    assert "start decode-0" not in events


def test_mps_on_without_a_server_fails_before_any_daemon_starts(stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control on it
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    fragment = "mps: on, but no MPS server could start: nvidia-cuda-mps-control is not on the PATH"
    with pytest.raises(LaunchError, match=fragment), stubs.launcher([], mps="on") as launcher:
        launcher.start(timeout=30)
    assert stubs.events() == []


def test_mps_auto_without_a_server_runs_the_daemons_time_sliced(stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    daemons = [{**daemon, "device": "cuda"} for daemon in stubs.raw["daemons"]]
    lines = []
    with stubs.launcher(lines, mps="auto", daemons=daemons) as launcher:
        launcher.start(timeout=30)
        launcher.stop(timeout=10)
    assert "on-mps prefill-0" not in stubs.events() and "start decode-0" in stubs.events()
    assert any(line.startswith("mps: auto: no MPS server") for line in lines)


def test_mps_on_inside_an_mps_environment_joins_its_server(stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no control binary: none is started
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "pipes"))
    lines = []
    with stubs.launcher(lines, mps="on") as launcher:
        launcher.start(timeout=30)
        launcher.stop(timeout=10)
    assert "on-mps prefill-0" in stubs.events() and "on-mps decode-0" in stubs.events()
    assert f"daemons on the MPS server of CUDA_MPS_PIPE_DIRECTORY={tmp_path}/pipes" in lines


def test_mps_value_is_checked(tmp_path):
    raw = {**two_daemons(*free_ports(2)), "mps": "sometimes"}
    with pytest.raises(ConfigError, match="mps"):
        parse(raw)
