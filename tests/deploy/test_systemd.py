"""deploy/systemd/: the unit templates pass `systemd-analyze verify` (where the machine has it),
and stop after the drain: SIGTERM to the daemon alone, a stop timeout above drain_timeout_s."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvferry.daemon.cli.main import main
from kvferry.daemon.server.config import DaemonConfig, RouterConfig

from .conftest import DEPLOY

SYSTEMD = DEPLOY / "systemd"
TEMPLATES = {"prefill": "prefill-0", "decode": "decode-0", "router": "router-0"}
SHIPPED_BIN = "/opt/kvferry/bin/kvferry"


def _unit(role: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / f"kvferry-{role}@.service").read_text())
    return parser


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    for path in SYSTEMD.iterdir():
        # the units name the installed kvferry; here, this environment's
        text = path.read_text().replace(SHIPPED_BIN, str(Path(sys.executable).parent / "kvferry"))
        (tmp_path / path.name).write_text(text)
    assert (Path(sys.executable).parent / "kvferry").is_file()
    units = [f"kvferry-{role}@{name}.service" for role, name in TEMPLATES.items()]
    units += [p.name for p in SYSTEMD.glob("*.target")]
    done = subprocess.run(
        [analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    # unknown keys and bad values are only warnings (exit 0): any line about our units fails
    said = [line for line in (done.stdout + done.stderr).splitlines() if "kvferry" in line]
    assert done.returncode == 0 and not said, "\n".join(said) or done.stderr


@pytest.mark.parametrize("role", TEMPLATES)
def test_unit_drains_before_it_is_killed(role):
    service = _unit(role)["Service"]
    member = (
        RouterConfig(targets=["http://a:1"]) if role == "router" else DaemonConfig(role="prefill")
    )
    assert float(service["TimeoutStopSec"]) > member.drain_timeout_s
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the ranks stop when their daemon tells them
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536


@pytest.mark.parametrize("role", TEMPLATES)
def test_unit_serves_its_instance_with_a_real_command(role):
    service = _unit(role)["Service"]
    program, verb, *options = service["ExecStart"].split()
    assert program == SHIPPED_BIN
    assert verb == ("router" if role == "router" else "serve") and verb in main.commands
    assert options[options.index("--name") + 1] == "%i"
    assert "-/etc/kvferry/%i.env" in (SYSTEMD / f"kvferry-{role}@.service").read_text()
