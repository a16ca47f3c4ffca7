"""`RouterConfig` in a deployment file, `kvferry config check` of it, `kvferry router` picking
one, and what the launcher needs of routers."""

import subprocess
import sys
import types

import pytest

from kvferry.daemon.cli.launcher import Launcher, serve_command
from kvferry.daemon.server.config import ConfigError, parse
from ports import free_ports
from support.cli_sim import invoke, one_error_line, two_daemons, write_yaml


def with_routers(*routers: dict) -> dict:
    raw = two_daemons(*free_ports(2))
    raw["routers"] = list(routers)
    return raw


def router(**fields) -> dict:
    return {"name": "router-0", "http_port": 17900, "targets": ["http://127.0.0.1:17001"], **fields}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"targets": []}, "needs at least one decode daemon address in `targets`"),
        ({"targets": ["tcp://127.0.0.1:1"]}, "targets[0]='tcp://127.0.0.1:1' is not http://"),
        ({"targets": ["http://a:1", "http://a:x"]}, "targets[1]='http://a:x' is not http://"),
        ({"targets": ["http://a:1/v1"]}, "'http://a:1/v1' is not http://<host>:<port>"),
        ({"targets": ["http://a:1", "http://a:1"]}, "lists an address twice"),
        ({"attempts": 0}, "attempts=0 must be >= 1"),
        ({"backoff_s": 0}, "backoff_s=0 must be > 0"),
        ({"request_timeout_s": -1}, "request_timeout_s=-1 must be > 0"),
        ({"http_port": 70000}, "http_port=70000 is not a TCP port"),
        ({"retries": 2}, "unknown field `retries`"),
    ],
)
def test_a_bad_router_is_refused_naming_the_field_and_value(fields, fragment):
    with pytest.raises(ConfigError) as failed:
        parse(with_routers(router(**fields)), source="d.yaml")
    assert fragment in str(failed.value)
    assert "$.routers[0]" in str(failed.value)


def test_a_router_without_targets_is_refused():
    raw = with_routers({"name": "router-0"})
    with pytest.raises(ConfigError, match=r"missing required field `targets` - at `\$.routers"):
        parse(raw)


def test_config_check_counts_routers_and_names_a_bad_one(tmp_path):
    good = write_yaml(tmp_path, with_routers(router()), "good.yaml")
    result = invoke("config", "check", good)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{good}: ok (2 daemons, 1 router)\n"
    bad = write_yaml(tmp_path, with_routers(router(attempts=0)), "bad.yaml")
    line = one_error_line(invoke("config", "check", bad))
    assert "attempts=0" in line and "$.routers[0]" in line and bad in line


def test_router_command_serves_the_named_router(tmp_path, monkeypatch):
    served = []
    fake = types.ModuleType("kvferry.daemon.router.server")
    fake.serve = lambda config: served.append(config) or 0
    monkeypatch.setitem(sys.modules, "kvferry.daemon.router.server", fake)
    two = write_yaml(tmp_path, with_routers(router(), router(name="router-1", http_port=17901)))
    assert invoke("router", "--config", two, "--name", "router-1").exit_code == 0
    assert [r.name for r in served] == ["router-1"]
    assert "pick one with --name" in one_error_line(invoke("router", "--config", two))
    line = one_error_line(invoke("router", "--config", two, "--name", "decode-0"))
    assert "no router named 'decode-0' (routers: router-0, router-1)" in line
    none = write_yaml(tmp_path, with_routers(), "none.yaml")
    assert "add one under `routers:`" in one_error_line(invoke("router", "--config", none))
    assert "Serve one router of a deployment file" in invoke("router", "--help").output


def test_the_launcher_starts_routers_last_with_their_own_command(tmp_path):
    raw = with_routers(router())
    launcher = Launcher(parse(raw), command=serve_command("d.yaml"))
    assert [(c.name, c.role) for c in launcher.children][-1] == ("router-0", "router")
    assert launcher.children[-1].url == "http://127.0.0.1:17900"
    argv = serve_command("d.yaml")(launcher.children[-1].daemon)
    assert argv[3:] == ["router", "--config", "d.yaml", "--name", "router-0"]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"name": ""}, "routers[0] (router) has no name"),
        ({"name": "decode-0"}, "name 'decode-0' is used more than once"),
        ({"http_port": 0}, "router-0: http_port is 0"),
    ],
)
def test_deployments_with_routers_the_launcher_refuses(fields, fragment):
    deployment = parse(with_routers(router(**fields)))
    with pytest.raises(ConfigError) as refused:
        Launcher(deployment, command=serve_command("d.yaml"))
    assert fragment in str(refused.value)


def test_the_router_runs_without_torch():
    code = "import sys, kvferry.daemon.router.server; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
