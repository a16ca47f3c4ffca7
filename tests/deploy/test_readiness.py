"""What the Kubernetes readiness probe relies on: a daemon that is draining after SIGTERM
answers /health with 503 `stopping` (the pod leaves its service) while it still serves
/metrics, and the process lives on until its requests are done."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import zmq

from kvferry.transport.control import request as control_request
from kvferry.transport.messages import Ack, Codec, SubmitPrompt
from support.cluster import FAST_TRANSFER, prefill, running, wait_for, write


def _health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_a_draining_daemon_is_not_ready_but_alive(tmp_path):
    # a prompt whose room no decode rank registers keeps the daemon draining
    daemon = prefill("prefill-0", transfer={**FAST_TRANSFER, "bootstrap_timeout_s": 120},
                     drain_timeout_s=60)  # fmt: skip
    path = write(tmp_path, [daemon])
    with running(path, expect_clean_exit=False) as launcher, zmq.Context() as context:
        (child,) = launcher.children
        assert _health(child.url)[0] == 200
        address = f"tcp://127.0.0.1:{daemon['bootstrap_port']}"
        reply = control_request(context, Codec(), address, SubmitPrompt(1, [1, 2, 3]), 10)
        assert isinstance(reply, Ack)
        child.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _health(child.url)[0] == 503, "/health to turn 503", 30)
        assert _health(child.url)[1]["status"] == "stopping"
        with urllib.request.urlopen(f"{child.url}/metrics", timeout=10) as answer:
            assert answer.status == 200  # still scraped while it drains
        assert child.process.poll() is None
        child.process.kill()
