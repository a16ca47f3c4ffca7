"""Whatever a peer sends, the agents answer or fail the one room concerned, and keep serving."""

import time

import pytest
import torch
import zmq

from kvferry.transport.control import request
from kvferry.transport.dataplane import data_failure, failure
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.loopback import LoopbackDataPlane
from kvferry.transport.messages import Codec, ErrorReply, QueryPeers, RegisterRoom, TransferDone
from kvferry.transport.room import KVPoll
from kvferry.transport.tags import DONE_PIECE, MAX_DONE_BYTES, pack_tag, unpack_tag
from support.transfer_sim import (
    Deployment,
    Request,
    decode_matches,
    layout_for,
    prefill_fill,
    small_config,
    start_receivers,
    start_senders,
    wait_all,
    wait_idle,
)

CODEC = Codec()


@pytest.fixture
def dep():
    deployment = Deployment(4, 1, 1)
    yield deployment
    deployment.close()


def waiting_room(dep, seed=1, offset=0):
    """A registered decode room whose prefill side has sent nothing yet."""
    req = Request(dep.prefill.layouts[0], 32, seed=seed, offset=offset)
    prefill_fill(dep.prefill, req)
    receivers = start_receivers(dep.decode, req, dep.server.address)
    deadline = time.monotonic() + 5
    while receivers[0].poll() < KVPoll.WaitingForInput and time.monotonic() < deadline:
        time.sleep(0.005)
    assert receivers[0].poll() == KVPoll.WaitingForInput
    return req, receivers


def inject(dep, room_id, chunk, writer, nbytes):
    """Send a data message from a rogue plane straight to decode rank 0."""
    agent = dep.decode.agents[0]
    key = agent.rooms[room_id].key
    rogue = LoopbackDataPlane()
    rogue.send(
        rogue.endpoint(agent.core.data.address, print),
        torch.zeros(nbytes, dtype=torch.uint8),
        pack_tag(key, chunk, writer),
    )
    rogue.close()


@pytest.mark.parametrize(
    "piece, writer, nbytes, fragment",
    [
        (0, 0, 100, "100 bytes for piece 0"),
        (0, 0, 2 * 6144, "12288 bytes for piece 0"),  # two chunks: this decode takes one
        (9, 0, 3072, "piece 9 of a room of 2 chunks"),
        (0, 3, 3072, "prefill rank 3 sends no heads"),
        # a TransferDone behind the data: garbage, too large, from a rank not in the room
        (DONE_PIECE, 0, 100, "TransferDone from prefill rank 0: protocol version 0 is not"),
        (DONE_PIECE, 0, MAX_DONE_BYTES + 1, "TransferDone of 4097 bytes from prefill rank 0"),
        (DONE_PIECE, 7, 100, "TransferDone of 100 bytes from prefill rank 7"),
    ],
)
def test_bad_data_message_fails_only_its_room(dep, piece, writer, nbytes, fragment):
    req, receivers = waiting_room(dep)
    other, other_rx = waiting_room(dep, seed=2, offset=64)
    inject(dep, req.room, piece, writer, nbytes)
    assert wait_all(receivers) == [KVPoll.Failed]
    assert fragment in str(receivers[0].failure)
    other_tx = start_senders(dep.prefill, other)
    assert wait_all(other_rx + other_tx) == [KVPoll.Success] * 2
    assert decode_matches(dep.decode, other)
    assert wait_idle([dep.prefill, dep.decode])


def test_data_message_whose_handling_raises_fails_only_its_room(dep, monkeypatch):
    req, receivers = waiting_room(dep)
    other, other_rx = waiting_room(dep, seed=2, offset=64)
    agent = dep.decode.agents[0]
    data, key = agent.core.data, agent.rooms[req.room].key
    real_recv = data.recv

    def broken_recv(tag, buffer, then=None):
        if unpack_tag(tag)[0] == key:
            raise RuntimeError("recv bug")
        return real_recv(tag, buffer, then)

    monkeypatch.setattr(data, "recv", broken_recv)
    inject(dep, req.room, 0, 0, 6144)
    assert wait_all(receivers) == [KVPoll.Failed]
    assert "internal error: RuntimeError: recv bug" in str(receivers[0].failure)
    assert agent.core.stats.internal_errors == 1
    assert data.probe() is None  # discarded: its sender is not left waiting
    assert wait_idle([dep.decode])  # the ring region it was given is free again
    other_tx = start_senders(dep.prefill, other)
    assert wait_all(other_rx + other_tx) == [KVPoll.Success] * 2
    assert decode_matches(dep.decode, other)


def test_duplicate_chunk_is_refused(dep):
    req, receivers = waiting_room(dep)
    inject(dep, req.room, 0, 0, 6144)
    inject(dep, req.room, 0, 0, 6144)
    assert wait_all(receivers) == [KVPoll.Failed]
    assert "arrived twice" in str(receivers[0].failure)
    assert wait_idle([dep.decode])


@pytest.fixture
def spans():
    """A deployment whose decode ranks take messages of several chunks (up to 12 KiB: two)."""
    deployment = Deployment(4, 1, 1, config=small_config(max_message_bytes=2 * 6144))
    yield deployment
    deployment.close()


@pytest.mark.parametrize(
    "piece, nbytes, fragment",
    [
        (0, 6144 + 384, "6528 bytes for piece 0"),  # ends inside the second chunk
        (1, 2 * 6144, "12288 bytes for piece 1"),  # two chunks from the last one on
    ],
)
def test_a_message_of_chunks_must_end_on_a_chunk_of_the_room(spans, piece, nbytes, fragment):
    req, receivers = waiting_room(spans)
    inject(spans, req.room, piece, 0, nbytes)
    assert wait_all(receivers) == [KVPoll.Failed]
    assert fragment + " from rank 0, expected 6144 (or whole chunks from it on, up to 12288)" in (
        str(receivers[0].failure)
    )
    assert wait_idle([spans.decode])


def test_a_message_of_chunks_one_of_which_came_already_is_refused(spans):
    req, receivers = waiting_room(spans)
    inject(spans, req.room, 1, 0, 6144)  # the second chunk
    inject(spans, req.room, 0, 0, 2 * 6144)  # both chunks
    assert wait_all(receivers) == [KVPoll.Failed]
    assert "arrived twice" in str(receivers[0].failure)
    assert wait_idle([spans.decode])


def test_a_message_of_chunks_over_what_decode_takes_is_refused():
    dep = Deployment(4, 1, 1, config=small_config(max_message_bytes=4096))
    try:
        req, receivers = waiting_room(dep)
        inject(dep, req.room, 0, 0, 2 * 6144)
        assert wait_all(receivers) == [KVPoll.Failed]
        expected = "12288 bytes for piece 0 from rank 0, expected 6144 (or whole chunks from it "
        assert expected + "on, up to 4096)" in str(receivers[0].failure)
        assert wait_idle([dep.decode])
    finally:
        dep.close()


def test_messages_for_unknown_rooms_are_discarded(dep):
    rogue = LoopbackDataPlane()
    address = dep.decode.agents[0].core.data.address
    rogue.send(
        rogue.endpoint(address, print), torch.zeros(64, dtype=torch.uint8), pack_tag(999, 0, 0)
    )
    deadline = time.monotonic() + 5
    while dep.decode.agents[0].core.stats.unexpected_messages == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert dep.decode.agents[0].core.stats.unexpected_messages == 1
    rogue.close()


def register(address, **changes):
    fields = dict(
        room=5,
        layout=layout_for(4, 1, 0),
        ucx_address=b"x",
        control_address="tcp://127.0.0.1:9",
        recv_key=1,
        num_tokens=10,
        chunk_tokens=16,
        mode="staged",
    )
    fields.update(changes)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    # answers go to a socket nobody reads
    sock.setsockopt(zmq.IDENTITY, fields["control_address"].encode())
    sock.setsockopt(zmq.LINGER, 5000)  # deliver before closing
    sock.connect(address)
    sock.send(CODEC.encode(RegisterRoom(**fields)))
    sock.close()


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"num_tokens": 0}, "num_tokens=0"),
        ({"chunk_tokens": 1, "num_tokens": 70000}, "exceed 65535 messages"),
        ({"chunk_tokens": 1, "num_tokens": 30000, "layer_group": 1}, "x 3 layer groups"),
        ({"layer_group": -1}, "layer_group=-1"),
        ({"max_message_bytes": -1}, "max_message_bytes=-1"),
        ({"recv_key": 1 << 41}, "recv_key"),
        ({"mode": "slice"}, "mode"),
        ({"layout": layout_for(4, 1, 0, head_dim=4)}, "head_dim"),
    ],
)
def test_bad_registrations_fail_the_room_and_the_rank_keeps_serving(dep, changes, fragment):
    agent = dep.prefill.agents[0]
    register(agent.core.control.address, room=5, **changes)
    sender = agent.sender(5, changes.get("num_tokens", 10) or 10)
    assert wait_all([sender], timeout_s=5) == [KVPoll.Failed]
    assert fragment in str(sender.failure)
    req, receivers = waiting_room(dep, seed=3)
    senders = start_senders(dep.prefill, req)
    assert wait_all(senders + receivers) == [KVPoll.Success] * 2


@pytest.mark.parametrize(
    ("field", "first", "second"), [("layer_group", 1, 2), ("layer_taper", True, False)]
)
def test_decode_ranks_proposing_different_layer_groups_fail_the_room(dep, field, first, second):
    agent = dep.prefill.agents[0]
    proposal = {"room": 6, "layer_group": 2}
    register(agent.core.control.address, layout=layout_for(4, 2, 0), **{**proposal, field: first})
    register(
        agent.core.control.address,
        layout=layout_for(4, 2, 1),
        control_address="tcp://127.0.0.1:10",
        **{**proposal, field: second},
    )
    sender = agent.sender(6, 10)
    assert wait_all([sender], timeout_s=5) == [KVPoll.Failed]
    assert field in str(sender.failure)
    req, receivers = waiting_room(dep, seed=5)
    assert wait_all(start_senders(dep.prefill, req) + receivers) == [KVPoll.Success] * 2


@pytest.mark.parametrize("frames", [[b"junk"], [b""], [b"\x00\x01\xff"], [b"a", b"b"]])
@pytest.mark.parametrize("identity", [None, b"tcp://127.0.0.1:9"])
def test_garbage_on_a_control_port_is_answered_and_counted(dep, frames, identity):
    agent = dep.prefill.agents[0]
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    if identity is not None:  # a claimed address: answered all the same, over the connection
        dealer.setsockopt(zmq.IDENTITY, identity)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(agent.core.control.address)
    dealer.send_multipart(frames)
    assert dealer.poll(5000)
    assert isinstance(CODEC.decode(dealer.recv()), ErrorReply)
    assert agent.core.stats.bad_frames == 1
    assert not agent.core.control.is_open("tcp://127.0.0.1:9")  # no socket for a stranger
    dealer.close()
    req, receivers = waiting_room(dep, seed=4)
    assert wait_all(start_senders(dep.prefill, req) + receivers) == [KVPoll.Success] * 2


def test_request_times_out_on_a_silent_server():
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(TimeoutError, match="no reply"):
        request(
            ctx,
            CODEC,
            f"tcp://127.0.0.1:{port}",
            QueryPeers(),
            0.2,
        )
    silent.close(linger=0)


def test_a_transfer_cut_by_a_lost_peer_fails_as_a_peer_loss():
    lost = data_failure("UCXXConnectionResetError: reset", peer_gone=True)
    assert failure("receive", lost) == Failure(
        FailureKind.PEER_LOST, "peer lost: receive failed: UCXXConnectionResetError: reset"
    )
    missing = data_failure("no message with tag 0x5")
    assert failure("send", missing) == Failure(
        FailureKind.DATA_PLANE, "send failed: no message with tag 0x5"
    )


def test_a_transfer_done_as_a_control_frame_is_refused(dep):
    """TransferDone comes behind the data, on the data plane (its tag names the room's key); a
    control frame naming only the room's id is refused and leaves the room waiting."""
    req, receivers = waiting_room(dep, seed=6)
    agent = dep.decode.agents[0]
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(agent.core.control.address)
    dealer.send(CODEC.encode(TransferDone(req.room, 0, 2, 42)))
    assert dealer.poll(5000)
    assert "unexpected TransferDone" in CODEC.decode(dealer.recv()).reason
    dealer.close()
    assert receivers[0].poll() == KVPoll.WaitingForInput
    assert wait_all(start_senders(dep.prefill, req) + receivers) == [KVPoll.Success] * 2
