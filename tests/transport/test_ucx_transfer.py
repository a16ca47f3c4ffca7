"""Transfers between processes over real UCX (tcp and shared memory on loopback)."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from kvferry.staging.plan import plan_head_transfers
from kvferry.transport.room import KVPoll
from support.kvsim import TP_PAIRS
from support.transfer_sim import small_config
from support.ucx_side import TWO_PLANES, main

pytest.importorskip("ucxx", reason="the UCX data plane needs the ucxx package")

SUCCESS, FAILED = int(KVPoll.Success), int(KVPoll.Failed)
# plain fields: the config crosses into the side processes
CONFIG = msgspec.structs.asdict(
    small_config(
        bootstrap_timeout_s=20.0,
        transfer_timeout_s=60.0,
        ring_wait_timeout_s=20.0,
        heartbeat_interval_s=0.25,
        heartbeat_timeout_s=5.0,
        ucx_tls="tcp,sm,self",
    )
)


class Proc:
    """A side in a child process, driven through a pipe."""

    def __init__(self, role, heads, tp, config=CONFIG, **layout):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=main, args=(child, role, heads, tp, config, layout), daemon=True
        )
        self.proc.start()
        self.ready = self._reply(60)

    def __call__(self, name, *args, timeout_s=90):
        self.conn.send((name, args))
        return self._reply(timeout_s)

    def _reply(self, timeout_s):
        assert self.conn.poll(timeout_s), "the side process did not answer"
        status, value = self.conn.recv()
        assert status == "ok", value
        return value

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self("close", timeout_s=20)
            finally:
                self.proc.join(10)
                if self.proc.is_alive():
                    self.kill()


@pytest.fixture
def procs():
    made = []
    yield lambda *a, **kw: made.append(Proc(*a, **kw)) or made[-1]
    for proc in reversed(made):
        proc.close()


def reaches(side, seed, state, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if side("states", seed) == [int(state)]:
            return True
        time.sleep(0.02)
    return False


def transfer(prefill, decode, seeds, num_tokens=50, step=16):
    """Move requests `seeds`, their KV handed over `step` tokens at a time."""
    for i, seed in enumerate(seeds):
        decode("recv", seed, num_tokens, i * num_tokens, prefill.ready)
        prefill("send", seed, num_tokens, i * num_tokens, None, step)
    return [(prefill("wait", seed), decode("wait", seed)) for seed in seeds]


@pytest.mark.parametrize(
    "heads, src_tp, dst_tp, layout",
    [*((*pair, {}) for pair in TP_PAIRS), (1, 2, 1, {"mla": True, "head_dim": 32})],
)
def test_bit_exact_over_ucx(procs, heads, src_tp, dst_tp, layout):
    prefill = procs("prefill", heads, src_tp, **layout)
    decode = procs("decode", heads, dst_tp, **layout)
    for (p_states, p_reasons, _), (d_states, d_reasons, matches) in transfer(prefill, decode, [1]):
        assert p_states == [SUCCESS] * src_tp, p_reasons
        assert d_states == [SUCCESS] * dst_tp, d_reasons
        assert matches
    p_idle, sent, _ = prefill("idle")
    d_idle, _, received = decode("idle")
    assert p_idle and d_idle
    pairs = len(plan_head_transfers(heads, src_tp, dst_tp, mla=bool(layout)))
    assert sent == received == -(-50 // 16) * pairs  # one message per (chunk, writer, reader)


@pytest.mark.parametrize(
    "max_message_bytes, step, per_pair",
    [(0, 16, -(-50 // 16)), (256 << 10, 50, 1)],
    ids=["message-per-chunk", "chunks-together"],
)
def test_layer_wise_messages_over_ucx(procs, max_message_bytes, step, per_pair):
    """Three layers, a message per (chunk, layer, writer); where decode takes messages of
    several chunks (up to 256 KiB), the 50 tokens handed over at once go as one message per
    (layer, writer)."""
    config = dict(CONFIG, layer_group=1, max_message_bytes=max_message_bytes)
    prefill = procs("prefill", 4, 2, config)
    decode = procs("decode", 4, 1, config)
    results = transfer(prefill, decode, [2], step=step)
    for (p_states, p_reasons, _), (d_states, d_reasons, matches) in results:
        assert p_states == [SUCCESS] * 2, p_reasons
        assert d_states == [SUCCESS], d_reasons
        assert matches
    p_idle, sent, _ = prefill("idle")
    d_idle, _, received = decode("idle")
    assert p_idle and d_idle
    assert sent == received == per_pair * 3 * 2


def test_many_rooms_and_slice_mode_over_ucx(procs):
    config = dict(
        CONFIG, staging_bytes=16 << 10
    )  # a few chunks at a time: rooms queue for the ring
    prefill = procs("prefill", 4, 2, config)
    decode = procs("decode", 4, 1, config)
    for p_result, d_result in transfer(prefill, decode, list(range(10, 18)), num_tokens=40):
        assert p_result[0] == [SUCCESS, SUCCESS] and d_result[0] == [SUCCESS], (p_result, d_result)
        assert d_result[2]
    assert prefill("idle")[0] and decode("idle")[0]
    slice_config = dict(CONFIG, mode="slice")
    prefill = procs("prefill", 4, 2, slice_config)
    decode = procs("decode", 4, 1, slice_config)
    ((p_result, d_result),) = transfer(prefill, decode, [30], num_tokens=20)
    assert d_result[0] == [SUCCESS] and d_result[2], d_result
    assert prefill("idle")[1] == 2 * 20 * 6  # one message per token and plane, per writer


@pytest.mark.parametrize(
    "ahead, staging_bytes", [(True, None), (True, 12 << 10), (False, None), (None, None)],
    ids=["ahead", "ring-mostly-full", "off", "default"],
)  # fmt: skip
def test_receives_posted_ahead_of_their_messages(procs, ahead, staging_bytes):
    """A decode rank posts a room's receives as it registers, while its ring stays at most half
    full (the rest come by probe), or none with post_receives_ahead off (and by default for a
    cache in host memory): the KV arrives bit-exact either way, and the ring is empty after."""
    config = dict(CONFIG, post_receives_ahead=ahead, staging_bytes=staging_bytes)
    prefill = procs("prefill", 4, 2, config)
    decode = procs("decode", 4, 1, config)
    for (p_states, p_reasons, _), (d_states, d_reasons, matches) in transfer(
        prefill, decode, [3, 4]
    ):
        assert p_states == [SUCCESS] * 2 and d_states == [SUCCESS], (p_reasons, d_reasons)
        assert matches
    d_idle, _, received = decode("idle")
    assert d_idle and prefill("idle")[0]
    posted_ahead = decode("stats")[0]["receives_ahead"]
    if not ahead:  # off, or the default for a cache in host memory
        assert posted_ahead == 0
    elif staging_bytes is None:
        assert posted_ahead == received == 2 * -(-50 // 16) * 2  # rooms x chunks x writers
    else:  # 6 KiB of a 12 KiB ring: some of each room's messages, not all
        assert 0 < posted_ahead < received


def test_receives_posted_ahead_give_way_when_the_ring_fills(procs):
    """Two rooms registered, the second sent first, rings of two messages on both sides: the
    first room's receive posted ahead holds the decode ring's oldest region, so the second
    room's messages fill the ring, and its unsent ones the prefill ring, where the first
    room's KV would have to go to reach decode. A message that finds the decode ring full
    revokes the receives posted ahead (their messages come by probe later): both rooms
    arrive."""
    # two chunks of 192 KiB: sent by rendezvous, so a send holds its prefill region until
    # decode has taken the message (small ones leave at once, eagerly)
    config = dict(CONFIG, chunk_tokens=64, staging_bytes=384 << 10, post_receives_ahead=True)
    prefill = procs("prefill", 4, 1, config, head_dim=64)
    decode = procs("decode", 4, 1, config, head_dim=64)
    for i, seed in enumerate([7, 8]):
        decode("recv", seed, 256, i * 256, prefill.ready)
        assert reaches(decode, seed, KVPoll.WaitingForInput)
    assert decode("stats")[0]["receives_ahead"] == 1  # half the ring: room 7's first chunk
    prefill("send", 8, 256, 256, None, 256)
    deadline = time.monotonic() + 10
    while decode("stats")[0]["ring_waits"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decode("stats")[0]["ring_waits"] > 0
    prefill("send", 7, 256, 0, None, 256)
    for seed in (8, 7):
        states, reasons, matches = decode("wait", seed)
        assert states == [SUCCESS] and matches, (seed, reasons)
    assert decode("idle")[0] and prefill("idle")[0]


def test_messages_of_revoked_receives_come_by_probe(procs):
    """Receives posted ahead are revoked (the ring was full), and their messages arrive before
    the decode thread has taken the cancellations in: the probe that finds them must not take
    them for duplicates of the receives just cancelled. The room arrives bit-exact."""
    config = dict(CONFIG, post_receives_ahead=True)  # a cache in host memory: not by default
    prefill = procs("prefill", 4, 1, config)
    decode = procs("decode", 4, 1, config)
    _, (d_states, d_reasons, _) = transfer(prefill, decode, [6])[0]  # the endpoints wired up
    assert d_states == [SUCCESS], d_reasons
    decode("recv", 5, 50, 50, prefill.ready)
    assert reaches(decode, 5, KVPoll.WaitingForInput)
    decode("revoke_and_hold")
    prefill("send", 5, 50, 50)
    assert prefill("idle")[0]  # every send complete: the messages are at decode's worker
    decode("release")
    states, reasons, matches = decode("wait", 5)
    assert states == [SUCCESS] and matches, reasons
    assert decode("idle")[0] and prefill("idle")[0]


@pytest.mark.parametrize("scale", [2, 0.5], ids=["longer", "shorter"])
def test_a_message_of_the_wrong_size_into_a_receive_posted_ahead(procs, scale):
    """A message longer than its receive posted ahead writes nothing past it, a shorter one
    launches no scatter: either fails its room with the sizes said, gives its ring region
    back, and the rank serves the next room."""
    config = dict(CONFIG, post_receives_ahead=True)  # a cache in host memory: not by default
    prefill = procs("prefill", 4, 1, config)
    decode = procs("decode", 4, 1, config)
    decode("recv", 5, 50, 0, prefill.ready)
    assert reaches(decode, 5, KVPoll.WaitingForInput)
    assert decode("stats")[0]["receives_ahead"] == -(-50 // 16)
    assert decode("inject", 5, 0, 0, scale)
    states, reasons, _ = decode("wait", 5)
    assert states == [FAILED], reasons
    assert ("truncated" if scale > 1 else "where") in reasons[0].lower(), reasons
    assert decode("idle")[0]
    _, (d_states, d_reasons, matches) = transfer(prefill, decode, [6])[0]
    assert d_states == [SUCCESS] and matches, d_reasons


def test_decode_killed_mid_transfer(procs):
    prefill = procs("prefill", 4, 2)
    doomed = procs("decode", 4, 1)
    healthy = procs("decode", 4, 1)
    doomed("recv", 1, 64, 0, prefill.ready)
    prefill("send", 1, 64, 0, 16)  # only the first chunk: the room stays mid-transfer
    healthy("recv", 2, 64, 64, prefill.ready)
    prefill("send", 2, 64, 64, 16)
    assert reaches(doomed, 1, KVPoll.Transferring) and reaches(healthy, 2, KVPoll.Transferring)
    doomed.kill()
    states, reasons, _ = prefill("wait", 1, 20)
    assert states == [FAILED, FAILED], states
    assert all("peer lost" in r for r in reasons), reasons
    prefill("more", 2, 16)  # the other room, mid-transfer too, carries on
    states, reasons, matches = healthy("wait", 2)
    assert states == [SUCCESS] and matches, reasons
    assert prefill("idle")[0]


@pytest.mark.parametrize("ahead", [True, None], ids=["posted-ahead", "default"])
def test_prefill_killed_mid_transfer(procs, ahead):
    config = dict(CONFIG, post_receives_ahead=ahead)
    prefill = procs("prefill", 4, 1, config)
    decode = procs("decode", 4, 1, config)
    decode("recv", 1, 64, 0, prefill.ready)
    prefill("send", 1, 64, 0, 16)
    assert reaches(decode, 1, KVPoll.Transferring)
    prefill.kill()
    states, reasons, _ = decode("wait", 1, 15)
    assert states == [FAILED] and "peer lost" in reasons[0], reasons
    # those posted ahead were cancelled: the ring is empty; by default none on a host cache
    assert decode("stats")[0]["receives_ahead"] == (-(-64 // 16) if ahead else 0)
    assert decode("idle")[0]


@pytest.mark.gpu
@pytest.mark.parametrize("together", [False, True], ids=["chunks", "together"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "ucxx"])
@pytest.mark.parametrize("heads, src_tp, dst_tp", [(8, 2, 1), (2, 4, 1)])
def test_gpu_caches_over_cuda_ipc(procs, heads, src_tp, dst_tp, native, together):
    """Bit-exact KV on decode, with the scatters launched by the native receives' completions
    and by the receive pipeline; a message per chunk, or the whole prompt's chunks in one."""
    config = dict(CONFIG, ucx_tls="cuda_ipc,cuda_copy,tcp,sm,self", native_ucx=native)
    if together:
        config["max_message_bytes"] = 256 << 10
    prefill = procs("prefill", heads, src_tp, config, device="cuda")
    decode = procs("decode", heads, dst_tp, config, device="cuda")
    for (p_states, p_reasons, _), (d_states, d_reasons, matches) in transfer(
        prefill, decode, [1, 2], step=50 if together else 16
    ):
        assert p_states == [SUCCESS] * src_tp, p_reasons
        assert d_states == [SUCCESS] * dst_tp and matches, d_reasons
    assert prefill("idle")[0] and decode("idle")[0]


# Runs in a child (UCX reads its settings once per process): an endpoint closed once nothing
# is sent over it fires no error, and a new one to the same peer carries messages again.
ENDPOINT_CHILD = (
    TWO_PLANES
    + r"""
import json
import torch
from kvferry.transport.ucx import UcxDataPlane

def exchange(sender, receiver, endpoint, tag):
    data = torch.arange(64, dtype=torch.uint8)
    send = sender.send(endpoint, data, tag)
    deadline = time.monotonic() + 30
    while receiver.probe() is None and time.monotonic() < deadline:
        progress()
    into = torch.zeros(64, dtype=torch.uint8)
    errors = [wait(receiver.recv(tag, into)), wait(send)]
    return errors == [None, None] and torch.equal(into, data)

plane, peer = UcxDataPlane("tcp,sm,self"), UcxDataPlane("tcp,sm,self")
broke = []
report = {"first": exchange(plane, peer, plane.endpoint(peer.address, broke.append), 1)}
plane.close_endpoint(peer.address)
report["open"] = plane.open_endpoints
report["second"] = exchange(plane, peer, plane.endpoint(peer.address, broke.append), 2)
report["broke"] = broke
print(json.dumps(report), flush=True)
plane.close()
peer.close()
"""
)


def test_closed_endpoint_fires_no_error_and_reopens():
    proc = subprocess.run(
        [sys.executable, "-c", ENDPOINT_CHILD], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"first": True, "open": 0, "second": True, "broke": []}


def test_device_bytes_describe_exactly_the_tensors_bytes():
    """The light array interface a data message's device buffer is handed to UCX with."""
    import torch
    from ucxx._lib.arr import Array

    from kvferry.transport.ucx import _DeviceBytes

    backing = torch.zeros(4096, dtype=torch.uint8)
    region = backing.narrow(0, 1000, 3000).view(torch.bfloat16)  # an offset, a wider dtype
    array = Array(_DeviceBytes(region))
    assert (array.ptr, array.nbytes) == (backing.data_ptr() + 1000, 3000)
    assert array.cuda and array.contiguous
