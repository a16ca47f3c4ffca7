"""Whole daemons facing requests a stranger could send: sampling values at the edges, bodies that
cannot be served, clients that leave; and health that says what the daemon can do."""

import http.client
import json
import logging
import math
import signal
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
import zmq

from kvferry.daemon.server import ranks as ranks_module
from kvferry.daemon.server.config import load
from kvferry.daemon.server.daemon import Daemon
from kvferry.transport.control import request as control_request
from kvferry.transport.messages import Codec, ErrorReply, SubmitPrompt
from ports import free_port
from support.cluster import client, decode, prefill, wait_for, write
from support.rank_faults import rank_whose_transfer_thread_dies


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def _normal_request_works(launcher) -> None:
    url = client(launcher, "decode-0").url
    status, answer = _post(url, json.dumps({"prompt": [4, 5, 6], "max_tokens": 3}).encode())
    assert status == 200, answer
    assert len(answer["choices"][0]["token_ids"]) >= 1
    for name in ("prefill-0", "decode-0"):
        assert client(launcher, name).health()["status"] == "ok"


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 5e-324, 1e-30, 1e30])
def test_extreme_temperatures_are_served(pair, temperature):
    """Temperatures below float32's range once made softmax NaN in the prefill rank's sampler,
    and the daemon exited."""
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": temperature, "top_p": 0.5}
    status, answer = _post(client(pair, "decode-0").url, json.dumps(body).encode())
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    _normal_request_works(pair)


@pytest.mark.parametrize(
    "body, text",
    [
        (b'{"prompt": [1, 2, 3], "seed": 18446744073709551616}', "seed=18446744073709551616"),
        (b'{"prompt": [1, 2, 3], "seed": -1}', "seed=-1"),
        (b'{"prompt": [1, 2, 3], "temperature": 1e400}', "$.temperature"),
        (b'{"prompt": [1, 2, 3], "top_p": 1e400}', "$.top_p"),
        (b'{"prompt": [1, 2, 3], "temperature": NaN}', "not valid JSON"),
        (b'{"prompt": [1, 2, 3], "x": ' + b"[" * 50000 + b"]" * 50000 + b"}", "unknown field `x`"),
        (b'{"prompt": [1, 2, 3], "x": ' + b"[" * 50000, "unknown field `x`"),
        (b'{"prompt": [1, 2, 3], "stop": ' + b"[" * 50000, "$.stop"),
        (b'{"prompt": [1, 2, 3], "n": 2}', "n=2 is not supported"),
        (b'{"prompt": [1, 2, 3], "stop_token_ids": [-1]}', "stop_token_ids: -1 is outside"),
        (b'{"prompt": [1, 2, 3], "stop": ""}', "stop strings must not be empty"),
        (b'{"prompt": [1, 2, 3], "tools": []}', "unknown field `tools`"),
    ],
)
def test_values_that_cannot_be_served_get_a_400_naming_them(pair, body, text):
    status, answer = _post(client(pair, "decode-0").url, body)
    assert status == 400, answer
    assert text in answer["error"]["message"]
    _normal_request_works(pair)


def test_a_non_streaming_client_that_leaves_aborts_its_request(pair):
    decoder = client(pair, "decode-0")
    parts = urlsplit(decoder.url)
    body = json.dumps({"prompt": [9, 8, 7], "max_tokens": 1000}).encode()  # many seconds of work
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        wait_for(lambda: decoder.status()["requests"]["in_flight"], "the request in flight")
    aborted = 'kvferry_request_failures_total{kind="aborted"} 1.0'
    wait_for(lambda: aborted in decoder.metrics(), "the request aborted", 60)
    wait_for(lambda: not decoder.status()["requests"]["in_flight"], "the request ended")
    _normal_request_works(pair)


def test_decode_without_a_reachable_prefill_says_so_and_refuses(tmp_path):
    absent = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    d = decode("decode-0", [], prefill=[absent])
    path = write(tmp_path, [d])
    cli = [sys.executable, "-m", "kvferry.daemon.cli.main", "serve", "--config", str(path)]
    daemon = subprocess.Popen([*cli, "--name", "decode-0"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{d['http_port']}"
    try:
        wait_for(lambda: _health(url)[1].get("status") == "no_prefill", "no_prefill", 120)
        code, health = _health(url)
        assert code == 503 and health["prefill"][0]["reachable"] is False
        (entry,) = json.loads(_get(url, "/status")[1])["prefill"]
        assert entry["address"] == absent and entry["reachable"] is False
        assert "no reply" in entry["last_error"] and entry["last_seen"] is None
        assert f'kvferry_prefill_reachable{{prefill="{absent}"}} 0.0' in _get(url, "/metrics")[1]
        status, answer = _post(url, b'{"prompt": [1, 2, 3]}')
        assert status == 503 and "no prefill daemon can be reached" in answer["error"]["message"]
        assert absent in answer["error"]["message"]
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    assert code == 0


def _get(url: str, path: str) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    except OSError:
        return 0, "{}"  # not listening yet
    finally:
        conn.close()


def _health(url: str) -> tuple[int, dict]:
    code, text = _get(url, "/health")
    return code, json.loads(text)


def test_a_rank_whose_transfer_thread_dies_ends_the_daemon(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ranks_module, "worker_main", rank_whose_transfer_thread_dies)
    config = load(write(tmp_path, [prefill("prefill-0")])).daemons[0]
    daemon, codes = Daemon(config), []
    runner = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    with caplog.at_level(logging.ERROR, logger="kvferry.daemon"):
        runner.start()
        runner.join(120)
        if runner.is_alive():  # the rank lingers: stop it, and fail
            daemon.request_stop("the test gave up")
            runner.join(60)
            pytest.fail("the daemon kept running with a dead transfer thread")
    assert codes == [1]
    assert daemon.state == "failed"
    assert "the transfer thread died: RuntimeError('the transfer loop broke')" in caplog.text


@pytest.mark.parametrize(
    "fields, text",
    [
        ({"temperature": math.nan}, "temperature=nan"),
        ({"temperature": math.inf}, "temperature=inf"),
        ({"top_p": math.nan}, "top_p=nan"),
        ({"seed": -5}, "seed=-5"),
    ],
)
def test_prefill_refuses_sampling_values_from_the_wire(pair, fields, text):
    """The prefill daemon checks a SubmitPrompt's sampling values as the HTTP front does."""
    p = next(c.daemon for c in pair.children if c.name == "prefill-0")
    address = f"tcp://127.0.0.1:{p.bootstrap_port}"
    context = zmq.Context()
    try:
        message = SubmitPrompt(room=7, prompt=[1, 2, 3], **fields)
        reply = control_request(context, Codec(1 << 20), address, message, 30)
    finally:
        context.term()
    assert isinstance(reply, ErrorReply) and text in reply.reason
    _normal_request_works(pair)


def test_prefill_shows_what_its_bootstrap_server_refused(pair):
    """A refused frame at the bootstrap port shows in the prefill daemon's /status and /metrics."""
    prefill_client = client(pair, "prefill-0")
    before = prefill_client.status()["bootstrap"]
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.connect(before["address"])
        sock.send(b"not a frame")
        assert sock.poll(30_000), "no answer to a malformed frame"
        sock.close(linger=0)
    finally:
        context.term()
    after = prefill_client.status()["bootstrap"]
    assert after == {**before, "bad_frames": before["bad_frames"] + 1}
    line = f"kvferry_bootstrap_bad_frames_total {after['bad_frames']:.1f}"
    assert line in prefill_client.metrics().splitlines()
    decode_status = client(pair, "decode-0").status()
    assert decode_status["bootstrap"] is None
    assert [p["address"] for p in decode_status["prefill"]] == [before["address"]]
