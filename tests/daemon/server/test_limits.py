"""Limits a client cannot pass on a decode daemon's HTTP front: requests in progress per client,
body bytes, prompt tokens. Each refusal is clear (status, the limit named), counted in
`kvferry_limit_refusals_total{limit=...}`, and everyone else is served meanwhile."""

import asyncio
import json
import socket

import httpx
import pytest

from kvferry.daemon.server.client_limit import ClientLimit
from kvferry.daemon.server.metrics import Metrics
from support.cluster import client, decode, prefill, running, write
from support.metrics_sim import samples, snapshot

PER_CLIENT, BODY, PROMPT = 2, 4096, 16


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    p = prefill("prefill-0")
    d = decode(
        "decode-0",
        [p],
        http_max_requests_per_client=PER_CLIENT,
        http_max_body_bytes=BODY,
        scheduler={"max_prompt_tokens": PROMPT},
    )
    with running(write(tmp_path_factory.mktemp("limits"), [p, d])) as launcher:
        yield client(launcher, "decode-0").url


def refusals(url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("kvferry_limit_refusals_total{"):
            name, value = line.split('limit="')[1].split('"} ')
            counts[name] = float(value)
    return counts


def complete(url: str, source: str = "127.0.0.1", headers=None, **body) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=60) as http:
        return http.post(
            f"{url}/v1/completions",
            json={"prompt": [1, 2, 3], "max_tokens": 2, **body},
            headers=headers,
        )


def held_request(url: str) -> socket.socket:
    """A request in progress: its headers are in and the daemon has asked for its body (the
    interim 100 Continue says so), which it has not had yet."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY_OK)}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    assert sock.recv(1024).startswith(b"HTTP/1.1 100")
    return sock


BODY_OK = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2}).encode()


def test_requests_in_progress_per_client_are_bounded(url):
    before = refusals(url).get("http_max_requests_per_client", 0)
    held = [held_request(url) for _ in range(PER_CLIENT)]
    refused = complete(url)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert f"http_max_requests_per_client={PER_CLIENT}" in error["message"]
    assert refusals(url)["http_max_requests_per_client"] == before + 1
    posing = complete(url, headers={"X-Forwarded-For": "10.9.9.9"})  # not another client
    assert posing.status_code == 429
    assert complete(url, source="127.0.0.2").status_code == 200  # another client is served
    held[0].sendall(BODY_OK)  # one held request ends: this client may send another
    assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    assert complete(url).status_code == 200
    for sock in held:
        sock.close()


def test_a_body_over_the_limit_is_refused_and_counted(url):
    before = refusals(url).get("http_max_body_bytes", 0)
    refused = complete(url, user="x" * BODY)
    assert refused.status_code == 413
    assert f"http_max_body_bytes={BODY}" in refused.json()["error"]["message"]
    assert refusals(url)["http_max_body_bytes"] == before + 1
    assert complete(url).status_code == 200


def test_a_prompt_over_the_limit_is_refused_and_counted(url):
    before = refusals(url).get("max_prompt_tokens", 0)
    refused = complete(url, prompt=list(range(PROMPT + 1)))
    assert refused.status_code == 400
    assert f"max_prompt_tokens={PROMPT}" in refused.json()["error"]["message"]
    assert refusals(url)["max_prompt_tokens"] == before + 1
    assert complete(url, prompt=list(range(PROMPT))).status_code == 200


def test_every_limit_has_a_series_from_the_start(url):
    assert {"max_rooms_per_peer", "max_pending_rooms_per_peer", "max_frame_bytes"} <= set(
        refusals(url)
    )


def test_a_client_with_nothing_in_progress_leaves_no_trace():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])

    limit = ClientLimit(app, 1, calls.append)
    scope = {"type": "http", "path": "/v1/models", "client": ("10.0.0.1", 5)}
    asyncio.run(limit(scope, None, None))
    assert calls == ["/v1/models"] and limit.in_progress("10.0.0.1") == 0
    asyncio.run(limit(scope, None, None))  # the count went back down: served again
    assert calls == ["/v1/models"] * 2


def test_refusals_add_the_daemons_the_ranks_and_the_bootstrap_servers():
    metrics = Metrics("prefill", "p")
    metrics.refused("max_prompt_tokens")
    metrics.take(snapshot(0, limit_refusals={"max_rooms_per_peer": 2, "max_frame_bytes": 1}))
    metrics.take(snapshot(1, limit_refusals={"max_rooms_per_peer": 3}))
    metrics.count_bootstrap(lambda: {"oversized_frames": 4})
    counts = {
        dict(labels)["limit"]: value
        for (name, labels), value in samples(metrics.render().decode()).items()
        if name == "kvferry_limit_refusals_total"
    }
    assert counts == {
        "max_prompt_tokens": 1,
        "http_max_requests_per_client": 0,
        "http_max_body_bytes": 0,
        "max_frame_bytes": 5,
        "max_rooms_per_peer": 5,
        "max_pending_rooms_per_peer": 0,
    }
