"""Transfers between processes over real UCX (tcp and shared memory on loopback)."""

import json
import subprocess
import sys

import pytest

from kvferry.staging.plan import plan_head_transfers
from kvferry.transport.room import KVPoll
from support.kvsim import TP_PAIRS
from support.ucx_procs import CONFIG, FAILED, SUCCESS, reaches, transfer
from support.ucx_side import TWO_PLANES

pytest.importorskip("ucxx", reason="the UCX data plane needs the ucxx package")


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

    from kvferry.transport.ucxx_ops import _DeviceBytes

    backing = torch.zeros(4096, dtype=torch.uint8)
    region = backing.narrow(0, 1000, 3000).view(torch.bfloat16)  # an offset, a wider dtype
    array = Array(_DeviceBytes(region))
    assert (array.ptr, array.nbytes) == (backing.data_ptr() + 1000, 3000)
    assert array.cuda and array.contiguous
