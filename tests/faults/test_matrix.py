"""The fault matrix: each process of a pair (prefill daemon, prefill rank, decode daemon, decode
rank) x each fault (SIGKILL; SIGSTOP past the heartbeat timeout, then SIGCONT; restart on the same
addresses), with a request held in each stage at the moment of the fault. Held requests end,
each within its deadline, as the cell expects (served, or a clear error naming its kind); a fresh
request is served once the faulted daemon is back (a new incarnation its peer accepts); every
daemon then holds no page, ring byte or live room; no process of an old incarnation lingers.
docs/reliability.md has the table and the figures (`pytest -s` prints them)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvferry.daemon.cli.client import ClientError, DaemonClient
from kvferry.daemon.server.api import CompletionRequest
from support.cluster import client, wait_for, wait_idle
from support.held_stages import (
    COMPUTING,
    DECODING,
    REGISTERING,
    TRANSFERRING,
    WAITING_FOR_PROMPT,
)
from support.matrix_cluster import (
    REQUEST_TIMEOUT_S,
    alive,
    daemon_pid,
    inject,
    rank_pid,
    recover,
)

# stage -> the prompt held there (a marker first); the transferring one spans two chunks
HELD = {
    "registering": [REGISTERING, 7, 8, 9],
    "waiting for the prompt": [WAITING_FOR_PROMPT, 7, 8, 9],
    "computing": [COMPUTING, 7, 8, 9],
    "transferring": [TRANSFERRING, *range(1, 16)],
}
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30  # past this a request has not ended "within its time"
OK, ERROR = "served", "error"

# what each held request must come to; a cell not listed takes ERROR for every stage (the
# transferring one ends in an error in every cell: its last chunk never leaves)
EXPECTED = {
    ("prefill daemon", "kill"): {"decoding": OK},
    ("prefill daemon", "stop"): {"decoding": OK},
    ("prefill daemon", "restart"): {"decoding": OK},
    ("prefill rank", "kill"): {"decoding": OK},
    ("prefill rank", "stop"): {"decoding": OK},
    ("decode daemon", "stop"): {"decoding": OK},
    ("decode daemon", "restart"): {"decoding": OK},  # SIGTERM drains what is running
    ("decode rank", "stop"): {"decoding": OK},
}
CELLS = [
    (process, fault)
    for process in ("prefill daemon", "prefill rank", "decode daemon", "decode rank")
    for fault in ("kill", "stop", "restart")
    if not (process.endswith("rank") and fault == "restart")  # a rank restarts with its daemon
]


class Held:
    """One request per stage, sent at once; the decoding one streamed."""

    def __init__(self, url: str) -> None:
        self.url, self.pool = url, ThreadPoolExecutor(len(HELD) + 1)
        self.futures = {stage: self.pool.submit(self._send, p) for stage, p in HELD.items()}
        self.futures["decoding"] = self.pool.submit(self._stream)

    def _send(self, prompt: list[int]):
        return self._ended(CompletionRequest(prompt=prompt, max_tokens=4), stream=False)

    def _stream(self):
        request = CompletionRequest(prompt=[DECODING, 5, 6, 7], max_tokens=8, temperature=0)
        return self._ended(request, stream=True)

    def _ended(self, request: CompletionRequest, stream: bool) -> tuple[str, str, float]:
        """(served / error, the error's kind, time.monotonic() at its end)."""
        with DaemonClient(self.url, CLIENT_TIMEOUT_S) as c:
            try:
                c.stream(request) if stream else c.complete(request)
                return OK, "", time.monotonic()
            except ClientError as exc:
                return ERROR, exc.kind, time.monotonic()

    def outcomes(self, since: float) -> dict[str, tuple[str, str, float]]:
        """stage -> (served / error, the error's kind, seconds from `since` to the end)."""
        ended = {}
        for stage, future in self.futures.items():
            outcome, kind, end = future.result(timeout=CLIENT_TIMEOUT_S + 10)
            ended[stage] = (outcome, kind, round(end - since, 1))
        self.pool.shutdown()
        return ended


def _holding(launcher) -> bool:
    """The prefill rank holds a room waiting for its prompt, two registered (one of them with
    its pages) and one mid-transfer, as does the decode rank, its prompt all computed (only the
    computing hold still waits for a forward); decode runs the decoding one."""
    prefiller = client(launcher, "prefill-0").status()
    decoder = client(launcher, "decode-0").status()
    if not prefiller["ranks"] or not decoder["ranks"]:  # once its rank has reported
        return False
    rooms, pages = prefiller["ranks"][0]["rooms"], prefiller["ranks"][0]["kv_pages"]["used"]
    held = rooms["Bootstrapping"] >= 1 and rooms["WaitingForInput"] >= 2 and pages >= 1
    sending = rooms["Transferring"] >= 1 and decoder["ranks"][0]["rooms"]["Transferring"] >= 1
    computed = prefiller["requests"].get("prefilling") == 1
    running = decoder["requests"].get("running", 0)
    return held and sending and computed and running >= 1


def _target(launcher, process: str) -> tuple[str, int, list[int]]:
    """(daemon name, the pid to fault, every pid of that daemon)."""
    name = "prefill-0" if process.startswith("prefill") else "decode-0"
    daemon, rank = daemon_pid(launcher, name), rank_pid(launcher, name)
    return name, rank if process.endswith("rank") else daemon, [daemon, rank]


def _chosen(prefill: dict) -> bool:
    return prefill["reachable"] and not prefill["backing_off"]


def _served_again(launcher) -> None:
    decoder = client(launcher, "decode-0")
    # a prefill that failed requests is backed off for a while, then tried again
    wait_for(lambda: _chosen(decoder.status()["prefill"][0]), "prefill chosen again", 60)
    answer = decoder.complete(CompletionRequest(prompt=[3, 4, 5], max_tokens=4))
    assert answer.token_ids


@pytest.mark.parametrize("process, fault", CELLS)
def test_fault(cluster, process, fault):
    wait_idle(cluster)  # nothing left of an earlier cell that failed
    name, pid, pids = _target(cluster, process)
    cluster.gate.unlink(missing_ok=True)
    held = Held(client(cluster, "decode-0").url)
    wait_for(lambda: _holding(cluster), "every stage held", 60)
    began = time.monotonic()
    cluster.gate.touch()  # the decoding request goes on (a rank looks twice a second)
    inject(cluster, name, pid, fault)
    if fault == "kill":  # a daemon whose rank died exits on its own
        child = next(c for c in cluster.children if c.name == name)
        wait_for(lambda: child.returncode is not None, f"{name} to exit", 60)
    ended = held.outcomes(began)
    restarted = recover(cluster)
    _served_again(cluster)
    recovered = time.monotonic() - began
    print(f"\n{process} {fault}: {ended}; served again {recovered:.1f} s after; {restarted}")
    expected = EXPECTED.get((process, fault), {})
    for stage, (outcome, kind, seconds) in ended.items():
        assert outcome == expected.get(stage, ERROR), (stage, outcome, kind)
        assert kind != "client_timeout" and seconds < CLIENT_TIMEOUT_S, (stage, kind, seconds)
    if fault != "stop":  # an old incarnation leaves no process behind
        wait_for(lambda: not any(alive(p) for p in pids), "the old processes to go", 30)
    wait_idle(cluster)
