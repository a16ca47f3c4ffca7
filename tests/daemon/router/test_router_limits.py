"""A router's limits on its clients: requests in progress per client and body bytes, each
refused clearly (status, the limit named), counted, and other clients served meanwhile."""

import json
import socket

import httpx

from support.router_sim import complete, metric

REFUSALS = "kvferry_limit_refusals_total"
BODY = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4}).encode()


def held_request(url: str) -> socket.socket:
    """A request whose headers are in and whose body the router has asked for (100 Continue)
    but not had."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    assert sock.recv(1024).startswith(b"HTTP/1.1 100")
    return sock


def from_host(url: str, host: str, headers=None) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=host), timeout=60) as http:
        return http.post(f"{url}/v1/completions", content=BODY, headers=headers)


def test_requests_in_progress_per_client_are_bounded(stubs, routers):
    (stub,) = stubs(1)
    router = routers([stub.url], http_max_requests_per_client=1)
    held = held_request(router.url)
    refused = complete(router.url)
    assert refused.status_code == 429
    assert "http_max_requests_per_client=1" in refused.json()["error"]["message"]
    assert metric(router.url, REFUSALS, limit="http_max_requests_per_client") == 1
    posing = from_host(router.url, "127.0.0.1", {"X-Forwarded-For": "10.9.9.9"})
    assert posing.status_code == 429  # a header does not make another client
    assert from_host(router.url, "127.0.0.2").status_code == 200  # another client
    held.sendall(BODY)
    assert held.recv(65536).startswith(b"HTTP/1.1 200")
    held.close()
    assert complete(router.url).status_code == 200


def test_a_body_over_the_limit_is_refused_and_counted(stubs, routers):
    (stub,) = stubs(1)
    router = routers([stub.url], http_max_body_bytes=256)
    refused = complete(router.url, user="x" * 256)
    assert refused.status_code == 413
    assert "http_max_body_bytes=256" in refused.json()["error"]["message"]
    assert metric(router.url, REFUSALS, limit="http_max_body_bytes") == 1
    assert not stub.seen  # nothing of it went on
    assert complete(router.url).status_code == 200
