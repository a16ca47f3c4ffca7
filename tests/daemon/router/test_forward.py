"""The router in front of stub decode daemons: answers passed on, what is retried on another
target and what is not, the errors naming each attempt, a client that leaves."""

import contextlib
import json
import re
import socket
from pathlib import Path

import httpx

from support.cluster import wait_for
from support.metrics_sim import exported
from support.router_sim import attempts, complete, events, metric

FLEET = Path(__file__).resolve().parents[3] / "docs" / "fleet.md"


def test_whole_and_streamed_answers_pass_through(stubs, routers):
    (stub,) = stubs(1)
    router = routers([stub.url])
    whole = complete(router.url)
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["text"] == "stub-0"
    assert whole.headers["x-kvferry-target"] == stub.url
    streamed = complete(router.url, stream=True)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    data = events(streamed)
    assert [json.loads(d)["choices"][0]["text"] for d in data[:2]] == ["stub-0", "!"]
    assert data[2] == "[DONE]"
    assert [body["stream"] for body in stub.seen] == [False, True]  # bodies went on as sent
    assert attempts(router.url) == {(stub.url, "ok"): 2}


def test_a_503_goes_to_another_target_which_then_takes_the_requests(stubs, routers):
    refusing, serving = stubs(2)
    refusing.mode = "unavailable"
    router = routers([refusing.url, serving.url], backoff_s=60)
    answers = [complete(router.url) for _ in range(4)]
    assert all(a.status_code == 200 and a.json()["choices"][0]["text"] == "stub-1" for a in answers)
    assert len(refusing.seen) == 1  # backed off after its failure
    assert metric(router.url, "kvferry_router_retries_total") == 1
    assert attempts(router.url)[(refusing.url, "failed")] == 1
    assert metric(router.url, "kvferry_router_answers_total", outcome="ok") == 4


def test_a_refused_connection_goes_to_another_target(stubs, routers):
    gone, serving = stubs(2)
    # a long poll interval: the router still counts `gone` as up when the requests come
    router = routers([gone.url, serving.url], poll_interval_s=60)
    gone.shutdown()
    gone.server_close()
    answers = [complete(router.url, stream=stream) for stream in (False, True, False)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert attempts(router.url)[(gone.url, "failed")] == 1
    assert metric(router.url, "kvferry_router_retries_total") == 1


def test_a_stream_that_begins_with_an_error_goes_to_another_target(stubs, routers):
    failing, serving = stubs(2)
    failing.mode = "first-error"
    router = routers([failing.url, serving.url], backoff_s=60)
    for _ in range(2):
        streamed = complete(router.url, stream=True)
        assert json.loads(events(streamed)[0])["choices"][0]["text"] == "stub-1"
    assert len(failing.seen) == 1
    assert "error" not in complete(router.url, stream=True).text


def test_a_stream_is_not_retried_once_its_first_event_went_out(stubs, routers):
    (breaking,) = stubs(1)
    breaking.mode = "break"
    router = routers([breaking.url])
    streamed = complete(router.url, stream=True)
    first, error, done = events(streamed)
    assert json.loads(first)["choices"][0]["text"] == "stub-0"
    assert json.loads(error)["error"]["code"] == "broken"
    assert breaking.url in json.loads(error)["error"]["message"]
    assert done == "[DONE]"
    assert attempts(router.url) == {(breaking.url, "broken"): 1}
    assert metric(router.url, "kvferry_router_retries_total") == 0


def test_answers_about_the_request_itself_are_passed_on_not_retried(stubs, routers):
    first, second = stubs(2)
    first.mode = second.mode = "bad"
    router = routers([first.url, second.url])
    refused = complete(router.url)
    assert refused.status_code == 400
    assert "says bad" in refused.json()["error"]["message"]
    first.mode = second.mode = "late-error"
    assert complete(router.url).status_code == 504
    assert len(first.seen) + len(second.seen) == 2
    assert metric(router.url, "kvferry_router_retries_total") == 0
    assert metric(router.url, "kvferry_router_answers_total", outcome="rejected") == 1


def test_when_every_attempt_fails_the_error_names_each(stubs, routers):
    targets = stubs(3)
    for stub in targets:
        stub.mode = "unavailable"
    router = routers([stub.url for stub in targets], attempts=2)
    failed = complete(router.url)
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "2 attempts" in error["message"]
    tried = [stub for stub in targets if stub.seen]
    assert len(tried) == 2
    for stub in tried:
        assert f"{stub.url}: answered 503 ({stub.name} says unavailable)" in error["message"]


def test_no_target_up_is_a_503_naming_each(stubs, routers):
    up, draining = stubs(2)
    router = routers([up.url, draining.url], attempts=3, backoff_s=60)
    draining.health = 503
    up.mode = "unavailable"
    wait_for(lambda: _state(router, draining.url) == "stopping", "the draining target out")
    failed = complete(router.url)
    assert failed.status_code == 502  # up refused; the draining one was not tried
    message = failed.json()["error"]["message"]
    assert f"no other target: {draining.url} (stopping)" in message
    again = complete(router.url)
    assert again.status_code == 503
    assert f"{up.url} (backoff)" in again.json()["error"]["message"]
    health = httpx.get(f"{router.url}/health", timeout=10)
    assert (health.status_code, health.json()["status"]) == (503, "no_target")


def test_a_draining_target_is_out_until_it_recovers(stubs, routers):
    first, second = stubs(2)
    router = routers([first.url, second.url])
    first.health = 503
    wait_for(lambda: _state(router, first.url) == "stopping", "the draining target out")
    for _ in range(3):
        assert complete(router.url).json()["choices"][0]["text"] == "stub-1"
    first.health = 200
    wait_for(lambda: _state(router, first.url) == "up", "the target back in")
    texts = {complete(router.url).json()["choices"][0]["text"] for _ in range(2)}
    assert texts == {"stub-0", "stub-1"}


def test_a_client_that_leaves_closes_its_request_on_the_target(stubs, routers):
    (stub,) = stubs(1)
    stub.mode = "hang"
    router = routers([stub.url])
    for stream in (False, True):
        stub.hung.clear()
        stub.left.clear()
        leave_soon(router.url, stream)
        assert stub.hung.wait(10) and stub.left.wait(10)
    wait_for(lambda: attempts(router.url).get((stub.url, "cancelled")) == 2, "both counted")
    assert metric(router.url, "kvferry_router_answers_total", outcome="cancelled") == 2
    assert _target(router, stub.url)["in_flight"] == 0


def test_a_client_that_leaves_mid_stream_closes_the_stream_on_the_target(stubs, routers):
    (stub,) = stubs(1)
    stub.mode = "stall"
    router = routers([stub.url])
    host, port = router.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": [1], "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: " not in received:  # the first event came through: the relay runs
            more = sock.recv(65536)
            assert more, received
            received += more
        assert stub.hung.wait(10)
    assert stub.left.wait(10)  # the router closed its stream on the stub
    wait_for(lambda: attempts(router.url).get((stub.url, "cancelled")) == 1, "counted")
    assert metric(router.url, "kvferry_router_answers_total", outcome="cancelled") == 1
    assert _target(router, stub.url)["in_flight"] == 0
    assert _state(router, stub.url) == "up"  # the client left: the daemon is not blamed


def test_a_request_past_its_timeout_is_a_504_and_the_target_is_not_blamed(stubs, routers):
    slow, spare = stubs(2)
    slow.mode = spare.mode = "hang"
    router = routers([slow.url, spare.url], request_timeout_s=1.0)
    late = complete(router.url)
    assert late.status_code == 504
    error = late.json()["error"]
    assert error["type"] == "timeout" and "timed out after 1 attempt" in error["message"]
    (tried,) = [stub for stub in (slow, spare) if stub.seen]
    assert attempts(router.url) == {(tried.url, "timeout"): 1}
    assert _state(router, tried.url) == "up"  # the request's time ran out, not the daemon


def test_the_router_own_paths(stubs, routers):
    (stub,) = stubs(1)
    router = routers([stub.url])
    models = httpx.get(f"{router.url}/v1/models", timeout=10)
    assert models.json()["data"][0]["id"] == "stub-0"
    health = httpx.get(f"{router.url}/health", timeout=10).json()
    assert (health["status"], health["role"], health["targets_up"]) == ("ok", "router", 1)
    missing = httpx.get(f"{router.url}/v2/nothing", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    big = httpx.post(f"{router.url}/v1/completions", content=b"x" * (2 << 20), timeout=10)
    assert big.status_code == 413
    assert metric(router.url, "kvferry_router_targets_up") == 1
    assert metric(router.url, "kvferry_router_target_up", target=stub.url) == 1


def leave_soon(url: str, stream: bool) -> None:
    """A request whose client gives up after a second without an answer."""
    body = {"prompt": [1], "stream": stream}
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)


def _target(router, url: str) -> dict:
    targets = httpx.get(f"{router.url}/status", timeout=10).json()["targets"]
    return next(t for t in targets if t["url"] == url)


def _state(router, url: str) -> str:
    return _target(router, url)["state"]


def test_the_metrics_are_those_docs_fleet_md_lists(stubs, routers):
    (stub,) = stubs(1)
    router = routers([stub.url])
    assert complete(router.url).status_code == 200
    rows = re.findall(r"^\| `(kvferry_router_\w+)` \| (\w+) \| ([^|]*) \|", FLEET.read_text(), re.M)
    listed = {name: (kind, frozenset(re.findall(r"`(\w+)`", cell))) for name, kind, cell in rows}
    text = httpx.get(f"{router.url}/metrics", timeout=10).text
    found = {n: v for n, v in exported(text).items() if n.startswith("kvferry_router_")}
    assert found == listed
