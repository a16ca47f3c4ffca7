"""The network between prefill and decode broken or slowed, where this machine lets a test make
network namespaces (root, `ip`, `tc`): prefill in a namespace of its own, joined to decode's by a
veth pair. A partition (both ends of the link down) ends a request held in computing with a
clear error within its deadline, and once healed the prefill is chosen again and serves; a slow
link (a 2 Mbit/s token bucket) serves. Both leave no page, ring byte or live room behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvferry.daemon.cli.client import ClientError, DaemonClient
from kvferry.daemon.cli.launcher import Launcher
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.config import load
from support.cluster import client, decode, prefill, wait_for, wait_idle, write
from support.held_stages import COMPUTING, serve_command
from support.matrix_cluster import REQUEST_TIMEOUT_S, TESTS_DIR, TRANSFER

NS, NS_LINK, LINK = "kvf-p", "kvf-p0", "kvf-d0"
PREFILL_IP, DECODE_IP = "10.77.0.1", "10.77.0.2"


def _namespaces_allowed() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2's ip and tc"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return None if probe.returncode == 0 else "unshare -n is not allowed here"


pytestmark = pytest.mark.skipif(
    _namespaces_allowed() is not None, reason=str(_namespaces_allowed())
)


def _sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command.split(), check=True, capture_output=True)


@contextlib.contextmanager
def _veth():
    _sh(f"ip netns add {NS}")
    try:
        _sh(
            f"ip link add {LINK} type veth peer name {NS_LINK} netns {NS}",
            f"ip addr add {DECODE_IP}/24 dev {LINK}",
            f"ip link set {LINK} up",
            f"ip netns exec {NS} ip addr add {PREFILL_IP}/24 dev {NS_LINK}",
            f"ip netns exec {NS} ip link set {NS_LINK} up",
            f"ip netns exec {NS} ip link set lo up",
        )
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def _both_ends(command: str) -> None:
    """`command` with {} for the link's end, run on both ends."""
    _sh(command.format(LINK), f"ip netns exec {NS} " + command.format(NS_LINK))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """prefill-0 in its own namespace, decode-0 in this one, the stage holds patched in."""
    tmp = tmp_path_factory.mktemp("netns")
    open_bind = {"allow_insecure_bind": True}  # a test's own link, nobody else on it
    p = prefill("prefill-0", host=PREFILL_IP, security=open_bind)
    p.update(transfer={**TRANSFER, "host": PREFILL_IP}, drain_timeout_s=5)
    d = decode("decode-0", [p], host=DECODE_IP, security=open_bind)
    d["transfer"] = {**TRANSFER, "host": DECODE_IP}
    d["scheduler"] = {"request_timeout_s": REQUEST_TIMEOUT_S}
    d["prefill"] = [f"tcp://{PREFILL_IP}:{p['bootstrap_port']}"]
    path = write(tmp, [p, d])
    held = serve_command(TESTS_DIR, str(path), str(tmp / "gate"))

    def command(daemon):
        inside = ["ip", "netns", "exec", NS] if daemon.role == "prefill" else []
        return inside + held(daemon)

    with _veth(), Launcher(load(path), command=command, log=lambda line: None) as launcher:
        launcher.start(timeout=180)
        yield launcher


def _chosen(launcher) -> bool:
    entry = client(launcher, "decode-0").status()["prefill"][0]
    return entry["reachable"] and not entry["backing_off"]


def test_a_partition_fails_what_crosses_it_and_heals(split):
    decoder = client(split, "decode-0")
    request = CompletionRequest(prompt=[COMPUTING, 7, 8], max_tokens=4)
    with ThreadPoolExecutor(1) as pool, DaemonClient(decoder.url, REQUEST_TIMEOUT_S + 30) as c:
        held = pool.submit(c.complete, request)
        prefill_status = client(split, "prefill-0")
        wait_for(lambda: prefill_status.status()["ranks"][0]["kv_pages"]["used"], "held", 60)
        began = time.monotonic()
        _both_ends("ip link set {} down")  # every packet dropped, both ways
        try:
            with pytest.raises(ClientError) as failed:
                held.result(timeout=REQUEST_TIMEOUT_S + 40)
            ended = time.monotonic() - began
        finally:
            _both_ends("ip link set {} up")
    print(f"\npartition: {failed.value.kind} after {ended:.1f} s")
    assert failed.value.kind in ("peer_lost", "timeout"), failed.value
    wait_for(lambda: _chosen(split), "prefill chosen again", 60)
    assert decoder.complete(CompletionRequest(prompt=[3, 4, 5], max_tokens=4)).token_ids
    print(f"partition: served again {time.monotonic() - began:.1f} s after it began")
    wait_idle(split)


def test_a_slow_link_serves(split):
    # netem (delay, loss) is often missing from a container's kernel; a token bucket is not
    _both_ends("tc qdisc add dev {} root tbf rate 2mbit burst 16kbit latency 500ms")
    try:
        decoder = client(split, "decode-0")
        for prompt in ([1, 2, 3], list(range(40))):
            assert decoder.complete(CompletionRequest(prompt=prompt, max_tokens=4)).token_ids
    finally:
        _both_ends("tc qdisc del dev {} root")
    wait_idle(split)
