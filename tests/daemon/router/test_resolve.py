"""Targets that are DNS names, through the router's system resolver: a name that starts to
stand for a daemon adds it, one that stops retires it (names from `KVFERRY_HOSTS_FILE`, which
the resolver reads before DNS)."""

import httpx

from kvferry.transport.resolve import HOSTS_FILE_ENV
from ports import free_port
from support.cluster import wait_for
from support.router_sim import complete


def test_a_name_adds_and_retires_daemons_as_it_changes(stubs, routers, tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    monkeypatch.setenv(HOSTS_FILE_ENV, str(hosts))
    port = free_port()
    first, second = stubs(2, hosts=("127.0.0.1", "127.0.0.2"), port=port)
    router = routers([f"http://decodes.test:{port}"])
    assert _health(router) == (503, "no_target")  # the name stands for nothing yet
    refused = complete(router.url)
    assert refused.status_code == 503 and "none is known" in refused.json()["error"]["message"]
    hosts.write_text("127.0.0.1 decodes.test\n")
    wait_for(lambda: _states(router) == {first.url: "up"}, "the first daemon to join")
    assert complete(router.url).json()["choices"][0]["text"] == "stub-0"
    hosts.write_text("127.0.0.1 decodes.test\n127.0.0.2 decodes.test\n")
    wait_for(lambda: _states(router).get(second.url) == "up", "the second daemon to join")
    texts = {complete(router.url).json()["choices"][0]["text"] for _ in range(2)}
    assert texts == {"stub-0", "stub-1"}
    hosts.write_text("127.0.0.2 decodes.test\n")
    wait_for(lambda: _states(router) == {second.url: "up"}, "the first daemon to retire")
    assert all(complete(router.url).json()["choices"][0]["text"] == "stub-1" for _ in range(2))
    assert _health(router) == (200, "ok")


def _health(router) -> tuple[int, str]:
    health = httpx.get(f"{router.url}/health", timeout=10)
    return health.status_code, health.json()["status"]


def _states(router) -> dict[str, str]:
    targets = httpx.get(f"{router.url}/status", timeout=10).json()["targets"]
    return {t["url"]: t["state"] for t in targets}
