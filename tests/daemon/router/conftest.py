"""Fixtures of the router tests: stub decode daemons, and routers run in this process (their
own thread and event loop) in front of any URLs."""

import pytest

from kvferry.daemon.router.server import RouterServer
from kvferry.daemon.server.config import RouterConfig
from support.router_sim import FAST, stub_server


@pytest.fixture
def stubs():
    """stubs(n, hosts, port) -> n stub decode daemons on loopback (on `hosts` in turn), each
    with .url, .mode, .health, .seen."""
    servers = []

    def make(count: int, hosts: tuple[str, ...] = ("127.0.0.1",), port: int = 0) -> list:
        for index in range(count):
            host = hosts[index % len(hosts)]
            servers.append(stub_server(f"stub-{len(servers)}", host, port))
        return servers[-count:]

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def routers():
    """routers(targets, resolver=None, **fields) -> a started RouterServer (.url, .router)."""
    started = []

    def make(targets: list[str], resolver=None, **fields) -> RouterServer:
        config = RouterConfig(name="r", targets=targets, **{**FAST, **fields})
        server = RouterServer(config) if resolver is None else RouterServer(config, resolver)
        server.start(timeout_s=30)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
