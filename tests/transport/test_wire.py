"""Wire messages, tags, room states and config: strict at every boundary."""

import msgspec
import pytest
import zmq

from kvferry.staging.copy_stream import Fence
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import request
from kvferry.transport.failure import Failure, FailureKind, aborted
from kvferry.transport.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    Codec,
    ErrorReply,
    Heartbeat,
    Peers,
    QueryPeers,
    RankInfo,
    RegisterRank,
    WireError,
)
from kvferry.transport.room import KVPoll, RoomStatus
from kvferry.transport.send_room import KVWritten
from kvferry.transport.tags import MAX_KEY, pack_tag, unpack_tag
from support.transfer_sim import layout_for

CODEC = Codec(max_frame_bytes=4096)


def test_round_trip_every_message_kind():
    info = RankInfo(layout_for(4, 2, 1), b"\x00ucx", "tcp://127.0.0.1:1")
    for message in (
        RegisterRank(info, b"token"),
        QueryPeers(),
        Peers([info]),
        Abort(2**64 - 1, "why"),
        Heartbeat(),
    ):
        assert CODEC.decode(CODEC.encode(message)) == message


@pytest.mark.parametrize(
    "frame, fragment",
    [
        (b"", "too short"),
        (b"\x00", "too short"),
        (
            (PROTOCOL_VERSION + 1).to_bytes(2, "big") + msgspec.msgpack.encode(Heartbeat()),
            "protocol version",
        ),
        (PROTOCOL_VERSION.to_bytes(2, "big") + b"\xc1garbage", "malformed"),
        (
            PROTOCOL_VERSION.to_bytes(2, "big") + msgspec.msgpack.encode({"type": "Nope"}),
            "malformed",
        ),
        (
            PROTOCOL_VERSION.to_bytes(2, "big")
            + msgspec.msgpack.encode({"type": "Abort", "room": 1}),
            "malformed",
        ),
        (
            PROTOCOL_VERSION.to_bytes(2, "big")
            + msgspec.msgpack.encode({"type": "Abort", "room": -1, "reason": ""}),
            "room id",
        ),
        (PROTOCOL_VERSION.to_bytes(2, "big") + b"\x00" * 5000, "exceeds the limit"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(frame, fragment):
    with pytest.raises(WireError, match=fragment):
        CODEC.decode(frame)


def test_truncated_frame_is_refused():
    frame = CODEC.encode(Abort(5, "a reason long enough to cut"))
    with pytest.raises(WireError, match="malformed"):
        CODEC.decode(frame[:-3])


def test_bad_layout_inside_a_message_is_refused():
    raw = msgspec.msgpack.encode(
        RegisterRank(RankInfo(layout_for(4, 2, 1), b"", "tcp://x:1"), b"token")
    )
    raw = raw.replace(b"\xa7tp_rank\x01", b"\xa7tp_rank\x05")  # rank 5 of a TP group of 2
    with pytest.raises(WireError, match="tp_rank=5"):
        CODEC.decode(PROTOCOL_VERSION.to_bytes(2, "big") + raw)


def test_tags_round_trip_and_refuse_out_of_range():
    assert unpack_tag(pack_tag(MAX_KEY, 65535, 255)) == (MAX_KEY, 65535, 255)
    assert unpack_tag(pack_tag(7, 3, 1)) == (7, 3, 1)
    for bad in ((MAX_KEY + 1, 0, 0), (1, 65536, 0), (1, 0, 256), (-1, 0, 0)):
        with pytest.raises(ValueError, match="out of range"):
            pack_tag(*bad)


def test_a_piece_waits_for_the_first_event_covering_its_layers():
    whole, first, second = (Fence() for _ in range(3))
    ready = KVWritten(whole, [(4, first), (8, second)])
    assert ready.for_layers(1) is first and ready.for_layers(4) is first
    assert ready.for_layers(5) is second and ready.for_layers(8) is second
    assert ready.for_layers(9) is whole
    assert KVWritten(whole, []).for_layers(1) is whole


def test_a_room_wakes_its_engine_for_the_states_an_engine_acts_on():
    woken = []
    status = RoomStatus(lambda: woken.append(status.state))
    for state in (KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success):
        status.advance(state)
    failed = RoomStatus(lambda: woken.append(failed.state))
    failed.advance(KVPoll.Transferring)
    failed.fail(Failure(FailureKind.TIMEOUT, "late"))
    assert woken == [KVPoll.WaitingForInput, KVPoll.Success, KVPoll.Failed]


def test_room_states_move_forward_and_failure_sticks():
    status = RoomStatus()
    status.advance(KVPoll.Transferring)
    status.advance(KVPoll.WaitingForInput)
    assert status.state == KVPoll.Transferring
    first = Failure(FailureKind.TIMEOUT, "first reason")
    assert status.fail(first)
    assert not status.fail(Failure(FailureKind.INTERNAL, "second reason"))
    status.advance(KVPoll.Success)
    assert (status.state, status.failure) == (KVPoll.Failed, first)
    done = RoomStatus()
    done.advance(KVPoll.Success)
    assert not done.fail(aborted("too late")) and done.state == KVPoll.Success


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"chunk_tokens": 0}, "chunk_tokens=0"),
        ({"heartbeat_timeout_s": 0.5, "heartbeat_interval_s": 1.0}, "heartbeat_timeout_s"),
        ({"ring_wait_timeout_s": 0}, "ring_wait_timeout_s"),
        ({"mode": "fast"}, "mode"),
        ({"layer_group": -1}, "layer_group=-1"),
        ({"layer_group": 2, "mode": "slice"}, "staged mode only"),
        ({"max_message_bytes": -1}, "max_message_bytes=-1"),
    ],
)
def test_config_validation(changes, fragment):
    with pytest.raises((ValueError, msgspec.ValidationError), match=fragment):
        msgspec.convert(changes, TransferConfig)


@pytest.fixture
def server():
    srv = BootstrapServer(tp_size=2, max_frame_bytes=4096)
    yield srv
    srv.close()


def raw_exchange(address, frames):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send_multipart(frames)
    assert sock.poll(5000), "the server did not answer"
    reply = sock.recv()
    sock.close()
    return CODEC.decode(reply)


@pytest.mark.parametrize(
    "frames",
    [
        [b"garbage"],
        [b""],
        [PROTOCOL_VERSION.to_bytes(2, "big") + b"\x92\x01"],
        [b"a", b"b"],
        [CODEC.encode(Heartbeat())],
        [CODEC.encode(Ack())],
    ],
)
def test_bootstrap_answers_bad_frames_and_keeps_serving(server, frames):
    reply = raw_exchange(server.address, frames)
    assert isinstance(reply, ErrorReply) and reply.reason
    assert server.bad_frames == 1
    ctx = zmq.Context.instance()
    for rank in range(2):
        info = RankInfo(layout_for(4, 2, rank), b"addr", f"tcp://127.0.0.1:{1000 + rank}")
        reply = request(ctx, CODEC, server.address, RegisterRank(info, server.token), 5)
        assert isinstance(reply, Ack)
    peers = request(ctx, CODEC, server.address, QueryPeers(), 5)
    assert [p.layout.tp_rank for p in peers.ranks] == [0, 1]


def test_bootstrap_refuses_inconsistent_ranks(server):
    ctx = zmq.Context.instance()
    first = RankInfo(layout_for(4, 2, 0), b"a", "tcp://127.0.0.1:1")
    token = server.token
    assert isinstance(request(ctx, CODEC, server.address, RegisterRank(first, token), 5), Ack)
    other_model = RankInfo(layout_for(4, 2, 1, head_dim=16), b"b", "tcp://127.0.0.1:2")
    reply = request(ctx, CODEC, server.address, RegisterRank(other_model, token), 5)
    assert isinstance(reply, ErrorReply) and "head_dim" in reply.reason
    wrong_group = RankInfo(layout_for(4, 4, 1), b"c", "tcp://127.0.0.1:3")
    reply = request(ctx, CODEC, server.address, RegisterRank(wrong_group, token), 5)
    assert isinstance(reply, ErrorReply) and "tp_size=4" in reply.reason
    reply = request(ctx, CODEC, server.address, QueryPeers(), 5)
    assert isinstance(reply, ErrorReply) and "1 of 2" in reply.reason
