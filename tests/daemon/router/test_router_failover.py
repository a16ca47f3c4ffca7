"""A deployment file with a router, run as `kvferry up` runs it (the launcher): one decode
daemon killed during a burst through the router fails no request that had not started
streaming; those it held go to the other decode daemon."""

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import yaml

from ports import free_port
from support.cluster import (
    FAST_TRANSFER,
    child_pids,
    decode,
    prefill,
    running,
    wait_for,
    write,
)
from support.router_sim import FAST, attempts, metric

PROMPT = list(range(1, 25))
# The prefill daemon is stopped (SIGSTOP) while the burst arrives, so that the doomed daemon
# holds requests none of whose bytes are out yet; the timeouts outlast that pause.
PATIENT = {**FAST_TRANSFER, "bootstrap_timeout_s": 30, "heartbeat_timeout_s": 15}


def with_router(path, targets: list[dict]) -> str:
    """The deployment at `path` with a router in front of the `targets` decode daemons."""
    raw = yaml.safe_load(path.read_text())
    urls = [f"http://127.0.0.1:{d['http_port']}" for d in targets]
    router = {"name": "router-0", "http_port": free_port(), "targets": urls, **FAST}
    raw["routers"] = [{**router, "poll_interval_s": 0.2, "backoff_s": 2.0}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f"http://127.0.0.1:{router['http_port']}"


def ask(url: str, stream: bool) -> tuple[int, list[str]]:
    """(status, data of each event) of one completion through the router."""
    body = {"prompt": PROMPT, "max_tokens": 24, "stream": stream}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    if not stream:
        return response.status_code, [response.text]
    return response.status_code, [e[len("data: ") :] for e in response.text.split("\n\n") if e]


def started_before_it_failed(data: list[str]) -> bool:
    """A stream that ended with an error had sent tokens first."""
    errors = [i for i, d in enumerate(data) if d.startswith("{") and "error" in json.loads(d)]
    return not errors or any("choices" in json.loads(d) for d in data[: errors[0]])


def test_a_decode_daemon_killed_in_a_burst_fails_no_request_not_yet_streaming(tmp_path):
    p = prefill("prefill-0", transfer=PATIENT)
    doomed = decode("decode-0", [p], transfer=PATIENT)
    spare = decode("decode-1", [p], transfer=PATIENT)
    path = write(tmp_path, [p, doomed, spare])
    router_url = with_router(path, [doomed, spare])
    doomed_url = f"http://127.0.0.1:{doomed['http_port']}"
    with running(path, expect_clean_exit=False) as launcher:
        assert [c.name for c in launcher.children][-1] == "router-0"
        with ThreadPoolExecutor(20) as pool:
            # at most 4 streams: with 5 requests held by the doomed daemon, one is a whole
            # answer, which has sent nothing when it dies
            kinds = [False] * 16 + [True] * 4
            frozen = _daemon(launcher, "prefill-0")
            _signal(frozen, signal.SIGSTOP)
            try:
                pending = [pool.submit(ask, router_url, stream) for stream in kinds]
                wait_for(lambda: _held(router_url, doomed_url) >= 5, "requests on decode-0")
                _signal(_daemon(launcher, "decode-0"), signal.SIGKILL)
            finally:
                _signal(frozen, signal.SIGCONT)
            answers = [future.result(timeout=120) for future in pending]
        wholes = [status for (status, _), stream in zip(answers, kinds, strict=True) if not stream]
        assert wholes == [200] * 16
        streams = [data for (_, data), stream in zip(answers, kinds, strict=True) if stream]
        assert all(data[-1] == "[DONE]" and started_before_it_failed(data) for data in streams)
        assert metric(router_url, "kvferry_router_retries_total") >= 1
        assert attempts(router_url)[(doomed_url, "failed")] >= 1
        assert ask(router_url, stream=False)[0] == 200  # decode-1 serves on alone
        codes = launcher.stop()
    assert next(iter(codes)) == "router-0" and codes["router-0"] == 0  # stopped first, cleanly


def _held(router_url: str, url: str) -> int:
    targets = httpx.get(f"{router_url}/status", timeout=10).json()["targets"]
    return next(t["in_flight"] for t in targets if t["url"] == url)


def _daemon(launcher, name: str):
    return next(c for c in launcher.children if c.name == name).process


def _signal(process, signum: int) -> None:
    """`signum` to a daemon and its rank processes (SIGKILL: gone without a word to anyone)."""
    for pid in [*child_pids(process.pid), process.pid]:
        os.kill(pid, signum)
