"""Forwarder alone, its HTTP client's transport (daemon/server/http_client.py) over httpx's
mock transport: a target whose connection breaks inside the HTTP stack as it opens is an
unreachable target, and the request goes to another."""

import asyncio
import time

import httpx

from kvferry.daemon.router.forward import Call, Forwarder
from kvferry.daemon.router.metrics import RouterMetrics
from kvferry.daemon.router.pool import TargetPool
from kvferry.daemon.server.config import RouterConfig
from kvferry.daemon.server.http_client import ConnectionSafeTransport

BROKEN, SERVING = "http://127.0.0.1:1", "http://127.0.0.1:2"


def answer(request: httpx.Request) -> httpx.Response:
    if str(request.url).startswith(BROKEN):
        # what anyio raises on uvloop for a connection its peer closed as it opened
        raise AttributeError("'NoneType' object has no attribute 'getpeername'")
    return httpx.Response(200, json={"choices": [{"text": "served"}]})


def test_a_connection_that_breaks_as_it_opens_goes_to_another_target():
    pool = TargetPool()
    pool.update("configured", [BROKEN, SERVING])
    for target in pool.targets():
        target.health = "up"
    pool.get(SERVING).in_flight = 1  # the least loaded goes first: the broken one
    config = RouterConfig(targets=[BROKEN, SERVING], backoff_s=60)
    now = time.monotonic()
    call = Call("POST", "/v1/completions", b"{}", False, now, now + 30)

    async def forward():
        upstream = ConnectionSafeTransport(httpx.MockTransport(answer))
        async with httpx.AsyncClient(transport=upstream) as client:
            forwarder = Forwarder(config, pool, client, RouterMetrics(pool), lambda: None)
            return await forwarder.forward(call)

    response = asyncio.run(forward())
    assert response.status_code == 200
    assert b"served" in response.body
    broken = pool.get(BROKEN)
    assert broken.backoff_until > time.monotonic()  # backed off, as for a refused connection
    assert broken.in_flight == 0
