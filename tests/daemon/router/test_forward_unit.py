"""Forwarder alone, over real sockets: a target whose every connection is reset as it opens
is a failed target, backed off, and the request goes to another."""

import asyncio
import socket
import struct
import threading
import time

import aiohttp

from kvferry.daemon.router.forward import Call, Forwarder
from kvferry.daemon.router.metrics import RouterMetrics
from kvferry.daemon.router.pool import TargetPool
from kvferry.daemon.server.config import RouterConfig
from support.router_sim import stub_server


def resetting() -> socket.socket:
    """A listening socket that resets each connection as it accepts it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_a_connection_reset_as_it_opens_goes_to_another_target():
    listener, serving = resetting(), stub_server("serving", "127.0.0.1", 0)
    broken_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        pool = TargetPool()
        pool.update("configured", [broken_url, serving.url])
        for target in pool.targets():
            target.health = "up"
        pool.get(serving.url).in_flight = 1  # the least loaded goes first: the broken one
        config = RouterConfig(targets=[broken_url, serving.url], backoff_s=60)
        now = time.monotonic()
        call = Call("POST", "/v1/completions", b"{}", False, now, now + 30)

        async def forward():
            async with aiohttp.ClientSession() as client:
                forwarder = Forwarder(config, pool, client, RouterMetrics(pool), lambda: None)
                return await forwarder.forward(call)

        response = asyncio.run(forward())
    finally:
        listener.close()
        serving.shutdown()
        serving.server_close()
    assert response.status_code == 200
    assert b"serving" in response.body
    broken = pool.get(broken_url)
    assert broken.backoff_until > time.monotonic()  # backed off, as for a refused connection
    assert broken.in_flight == 0
    assert broken.last_failure.startswith(("unreachable", "dropped")), broken.last_failure
