"""The transfer thread's native sleep (ucx_native.c kvf_sleep): UCX's events taken without the
GIL and without a turn, the thread handed back to Python when it has something to do (of a
group of receives posted ahead, when the last is in or one failed). Over real UCX on
loopback, in a child (UCX reads its settings once per process)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ucxx", reason="the UCX data plane needs the ucxx package")

CHILD = r"""
import json, logging, os, select, sys, threading, time
import torch
from kvferry.transport.ucx import UcxDataPlane

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
plane = UcxDataPlane("tcp,sm,self")  # the sender, driven by a thread of its own
peer = UcxDataPlane("tcp,sm,self")  # the receiver, asleep on this thread
endpoint = plane.endpoint(peer.address, lambda why: None)
bell_r, bell_w = os.pipe()
report = {"sleeps": peer.sleeps, "bell_fd": bell_r}

def send_in_background(tensor, tag):
    def run():
        op = plane.send(endpoint, tensor, tag)
        deadline = time.monotonic() + 30
        while not op.done() and time.monotonic() < deadline:
            plane.progress()
            if plane.arm():
                select.select([plane.wake_fd], [], [], 0.05)
    thread = threading.Thread(target=run)
    thread.start()
    return thread

def sleep_until_data(messages):
    wakes = []
    while len(wakes) < 20:
        woke, ready, cpu = peer.sleep((bell_r,), 10.0, messages)
        wakes.append(woke)
        if woke == "data":
            break
    return wakes

# a large message into a receive posted ahead: its pieces are taken asleep, and the thread is
# handed back once the receive has completed
big = torch.arange(8 << 20, dtype=torch.int64).to(torch.uint8)
into = torch.zeros(8 << 20, dtype=torch.uint8)
op = peer.expect(7, into)
before = peer.sleep_events
sender = send_in_background(big, 7)
report["big_wakes"] = sleep_until_data(messages=True)
peer.progress()
report["big"] = [op.done(), op.error() is None and torch.equal(into, big)]
report["big_events"] = peer.sleep_events - before
sender.join()

# nothing comes: the timeout ends it
report["idle"] = peer.sleep((bell_r,), 0.1, True)[0]

# one of the owner's descriptors turns readable: it ends the sleep, long before its timeout
threading.Timer(0.2, lambda: os.write(bell_w, b"x")).start()
report["bell"] = peer.sleep((bell_r,), 30.0, True)[:2]
os.read(bell_r, 1)

# a message nobody posted for: a wake while new messages are wanted ...
sender = send_in_background(torch.ones(64, dtype=torch.uint8), 8)
report["probed_wakes"] = sleep_until_data(messages=True)
peer.progress()
report["probed"] = peer.probe()
sender.join()
# ... and none while the owner leaves them waiting (its ring full): its timeout ends the sleep
sender = send_in_background(torch.ones(64, dtype=torch.uint8), 9)
sender.join()
report["held"] = peer.sleep((bell_r,), 0.5, False)[0]
peer.progress()
for tag in (8, 9):  # through ucxx: while one is in flight, every event wakes the sleep
    discard = peer.discard(tag)
    while not discard.done():
        peer.progress()
peer.progress()

# two receives posted ahead in one group: the first message in ends no sleep (its completion
# is quiet, taken in whatever turn comes next), the last one does
buffers = [torch.zeros(64, dtype=torch.uint8) for _ in range(4)]
group = peer.open_group()
first, second = peer.expect(20, buffers[0], None, group), peer.expect(21, buffers[1], None, group)
peer.close_group(group)
send_in_background(torch.full((64,), 3, dtype=torch.uint8), 20).join()
report["group_first"] = peer.sleep((bell_r,), 1.0, True)[0]
slept_until = time.time()
send_in_background(torch.full((64,), 4, dtype=torch.uint8), 21).join()
report["group_last"] = sleep_until_data(messages=True)
peer.progress()
report["group_done"] = [
    first.done() and first.finished_at < slept_until, second.done(),
    int(buffers[0][0]), int(buffers[1][0]), first.length,
]
# one of a group that fails (here: cancelled) wakes at once, the rest still in flight
group = peer.open_group()
third, fourth = peer.expect(22, buffers[2], None, group), peer.expect(23, buffers[3], None, group)
peer.close_group(group)
peer.cancel(third)
report["group_failed"] = sleep_until_data(messages=True)
peer.progress()
report["group_failed_done"] = [third.cancelled, fourth.done()]
peer.cancel(fourth)
sleep_until_data(messages=True)
peer.progress()
report["group_ended"] = fourth.cancelled
# while the owner waits for ring room, every completion wakes it, a group's too
group = peer.open_group()
fifth, sixth = peer.expect(24, buffers[0], None, group), peer.expect(25, buffers[1], None, group)
peer.close_group(group)
peer.all_loud(True)
send_in_background(torch.full((64,), 5, dtype=torch.uint8), 24).join()
report["all_loud"] = sleep_until_data(messages=True)
peer.progress()
report["all_loud_done"] = [fifth.done(), sixth.done()]
peer.all_loud(False)
peer.cancel(sixth)
sleep_until_data(messages=True)
peer.progress()
print(json.dumps(report), flush=True)
peer.close()
plane.close()
"""


def test_a_sleeping_thread_takes_ucx_events_itself_and_wakes_for_its_owner():
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(line)
    assert report["sleeps"]
    # one wake for the whole message, its bytes in when it came: the pieces before it were
    # taken inside the sleep
    assert report["big_wakes"] == ["data"]
    assert report["big"] == [True, True]
    assert report["big_events"] >= 1
    assert report["idle"] == "timer"
    assert report["bell"][0] == "fds" and report["bell"][1] == [report["bell_fd"]]
    assert report["probed_wakes"] == ["data"]
    assert report["probed"] == [8, 64]
    assert report["held"] == "timer"
    # a group's first completion came inside a sleep that went on to its timeout
    assert report["group_first"] == "timer"
    assert report["group_last"] == ["data"]
    assert report["group_done"] == [True, True, 3, 4, 64]
    assert report["group_failed"] == ["data"]
    assert report["group_failed_done"] == [True, False]
    assert report["group_ended"] is True
    assert report["all_loud"] == ["data"]
    assert report["all_loud_done"] == [True, False]
