"""`kvferry router`'s log at its default level: its own lines, not one for every HTTP request it
makes (every poll of a target, every request forwarded)."""

import subprocess
import sys

import httpx
import yaml

from ports import free_port
from support.cluster import wait_for
from support.router_sim import FAST, complete

DEADLINE_S = 60.0


def test_router_log_has_no_line_per_request(tmp_path, stubs):
    stub = stubs(1)[0]
    port = free_port()
    router = {"name": "r", "http_port": port, "targets": [stub.url], **FAST}
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"daemons": [], "routers": [router]}))
    command = [sys.executable, "-m", "kvferry.daemon.cli.main", "router", "--config", str(path)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:  # its /health is ok only after a poll of the stub succeeded
        return process.poll() is not None or _healthy(url)

    try:
        wait_for(ready, "the router's /health ok", DEADLINE_S)
        assert process.poll() is None, "the router exited"
        assert complete(url).status_code == 200  # and one request forwarded
        assert len(stub.seen) == 1
    finally:
        process.terminate()
        log = process.communicate(timeout=30)[1]
    assert "serving on" in log, log  # its own INFO lines are there
    assert "HTTP Request" not in log, log


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
