"""The native data path (transport/native.py, ucx_native.c) against ucxx's, over real UCX on
loopback. Each case runs in a child: UCX reads its settings once per process."""

import json
import os
import subprocess
import sys

import pytest

from support.ucx_side import TWO_PLANES

pytest.importorskip("ucxx", reason="the UCX data plane needs the ucxx package")

CHILD = (
    TWO_PLANES
    + r"""
import json, logging, sys
import torch
from kvferry.transport.dataplane import DoneOp
from kvferry.transport.ucx import UcxDataPlane

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
native = sys.argv[1] == "native"
plane = UcxDataPlane("tcp,sm,self", native=native)
peer = UcxDataPlane("tcp,sm,self", native=native)

def outcome(op):  # wait's answer as JSON can carry it
    error = wait(op)
    return getattr(error, "detail", error)

def arrived():
    deadline = time.monotonic() + 30
    while peer.probe() is None and time.monotonic() < deadline:
        progress()
    return peer.probe()

def take(tag, into):
    # receive `tag` once it is in (probe shows only the oldest message): the op, and the
    # launch records `then` was handed
    deadline = time.monotonic() + 30
    while True:
        handed = []
        op = peer.recv(tag, into, then=handed.append)
        if not isinstance(op, DoneOp) or time.monotonic() > deadline:
            return op, handed
        progress()

endpoint = plane.endpoint(peer.address, lambda why: None)
report = {"native": peer.native, "chains": peer.chains_copies}
tags = [11, 12, 13]
payloads = {tag: torch.full((1000 + tag,), tag, dtype=torch.uint8) for tag in tags}
sends = [plane.send(endpoint, payloads[tag], tag) for tag in tags]
report["sends"] = sorted({type(op).__name__ for op in sends})
report["probed"] = arrived()
launches = []
received = {}
for tag in reversed(tags):  # taken out of the order they came in
    into = torch.zeros(1000 + tag, dtype=torch.uint8)
    op, handed = take(tag, into)
    received[tag] = (op, into)
    launches += handed
report["errors"] = [outcome(op) for op, _ in received.values()] + [outcome(op) for op in sends]
report["equal"] = all(torch.equal(into, payloads[tag]) for tag, (_, into) in received.items())
report["then"] = [launch.function is None for launch in launches]
report["launched"] = [getattr(op, "launched", None) for op, _ in received.values()]
report["missing"] = outcome(peer.recv(99, torch.zeros(8, dtype=torch.uint8)))
if peer.native:  # every record in flight: the receive goes through ucxx, and chains nothing
    free, peer._native._free = peer._native._free, []
    send = plane.send(endpoint, payloads[11], 21)
    into = torch.zeros(1011, dtype=torch.uint8)
    op, handed = take(21, into)
    report["fallback"] = [type(op).__name__, outcome(op), torch.equal(into, payloads[11]), handed]
    peer._native._free = free
    wait(send)
# a small message is in whole when probed: its receive completes inside the post, with no event
# on the descriptor, so arm() must say there is more to progress (or the loop would sleep)
send = plane.send(endpoint, payloads[12], 41)
op, _ = take(41, torch.zeros(1012, dtype=torch.uint8))
report["inline"] = [op.done(), peer.arm(), outcome(op), op.done(), outcome(send)]
# receives posted ahead: one its message fills once it comes, one cancelled (its message never
# comes), and none while half the records or fewer are free
ahead = [torch.zeros(1013, dtype=torch.uint8) for _ in range(2)]
expected = [peer.expect(51, ahead[0]), peer.expect(52, ahead[1])]
report["ahead_posted"] = [type(op).__name__ for op in expected]
if peer.native:
    send = plane.send(endpoint, payloads[13], 51)
    peer.cancel(expected[1])
    report["ahead"] = [outcome(expected[0]), torch.equal(ahead[0], payloads[13]), outcome(send)]
    report["cancelled"] = outcome(expected[1])
    free, peer._native._free = peer._native._free, peer._native._free[: len(free) // 2]
    report["ahead_reserved"] = peer.expect(53, ahead[1]) is None
    peer._native._free = free
# a large message whose sender stops progressing: its receive outlives the plane's close
big = torch.ones(8 << 20, dtype=torch.uint8)
send = plane.send(endpoint, big, 31)
op, _ = take(31, torch.zeros(8 << 20, dtype=torch.uint8))
peer.close()
from kvferry.transport import native as native_module
report["closed"] = [op.done(), peer.native and peer._native.posted, len(native_module._ORPHANED)]
print(json.dumps(report), flush=True)
plane.close()
"""
)


def run_child(path: str, **env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, path],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(line) | {"log": proc.stderr}


def test_native_ucx_take_messages_in_any_order_and_end_cleanly():
    report = run_child("native")
    assert report["native"] and report["chains"]  # host memory: the completion copies
    assert report["sends"] == ["NativeOp"]
    assert report["probed"][0] == 11  # the oldest message, with its length
    assert report["probed"][1] == 1011
    assert report["errors"] == [None] * 6 and report["equal"]
    assert report["then"] == [True, True, True]  # each handed an empty launch record
    assert report["launched"] == [False, False, False]
    assert report["missing"] == "no message with tag 0x63"
    assert report["fallback"] == ["UcxOp", None, True, []]
    assert report["inline"] == [False, False, None, True, None]
    assert report["ahead_posted"] == ["NativeOp", "NativeOp"]
    assert report["ahead"] == [None, True, None]
    assert "canceled" in report["cancelled"].lower()
    assert report["ahead_reserved"]
    # closing did not wait for it: the record UCX may still complete into stays alive
    assert report["closed"] == [False, 1, 1]


def test_ucxx_path_agrees():
    report = run_child("ucxx")
    assert not report["native"] and report["sends"] == ["UcxOp"]
    assert report["errors"] == [None] * 6 and report["equal"]
    assert report["then"] == [] and report["launched"] == [None, None, None]
    assert report["ahead_posted"] == ["NoneType", "NoneType"]  # ucxx's path posts none ahead
    assert report["missing"] == "no message with tag 0x63"


def test_without_a_compiler_the_plane_goes_through_ucxx_and_says_why(tmp_path):
    report = run_child("native", CC=str(tmp_path / "no-such-cc"), KVFERRY_CACHE=str(tmp_path))
    assert not report["native"]
    assert "native path is unavailable" in report["log"]
    assert "no-such-cc" in report["log"]
    assert report["errors"] == [None] * 6 and report["equal"]
