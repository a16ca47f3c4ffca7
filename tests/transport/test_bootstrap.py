"""The bootstrap server takes registrations only from its daemon's ranks and survives any frame;
decode ranks refuse what a bootstrap server answers unless it is well formed."""

import threading

import msgspec
import pytest
import zmq

from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.control import request
from kvferry.transport.directory import check_ranks
from kvferry.transport.failure import FailureKind
from kvferry.transport.messages import (
    PROTOCOL_VERSION,
    Ack,
    Codec,
    ErrorReply,
    Peers,
    QueryPeers,
    RankInfo,
    RegisterRank,
    RegisterRoom,
    SubmitPrompt,
    WireError,
)
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Deployment,
    Request,
    layout_for,
    req_slots,
    small_config,
    wait_all,
)

CODEC = Codec(max_frame_bytes=4096)
CTX = zmq.Context.instance()


@pytest.fixture
def server():
    srv = BootstrapServer(tp_size=1, max_frame_bytes=4096)
    yield srv
    srv.close()


def info(address="tcp://127.0.0.1:1000", rank=0, tp=1):
    return RankInfo(layout_for(4, tp, rank), b"ucx", address)


def raw_frame(message, **changes) -> bytes:
    """`message` encoded with fields of its first RankInfo replaced, bypassing the checks."""
    raw = msgspec.to_builtins(message, builtin_types=(bytes,))
    target = raw.get("info") or (raw.get("ranks") or [raw])[0]
    target.update(changes)
    return PROTOCOL_VERSION.to_bytes(2, "big") + msgspec.msgpack.encode(raw)


def exchange(address, frames, timeout_ms=5000):
    sock = CTX.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        return CODEC.decode(sock.recv()) if sock.poll(timeout_ms) else None
    finally:
        sock.close()


def registered(server):
    return request(CTX, CODEC, server.address, QueryPeers(), 5)


def test_forged_registrations_are_refused_and_the_registry_stays(server):
    genuine = info()
    assert isinstance(
        request(CTX, CODEC, server.address, RegisterRank(genuine, server.token), 5), Ack
    )
    rogue = info("tcp://127.0.0.1:2000")
    for token in (b"", b"guess", server.token[:-1] + bytes([server.token[-1] ^ 1])):
        reply = request(CTX, CODEC, server.address, RegisterRank(rogue, token), 5)
        assert isinstance(reply, ErrorReply) and "token" in reply.reason
    no_token = msgspec.to_builtins(RegisterRank(rogue, b""), builtin_types=(bytes,))
    del no_token["token"]
    reply = exchange(
        server.address,
        [CODEC.encode(RegisterRank(rogue, b""))[:2] + msgspec.msgpack.encode(no_token)],
    )
    assert isinstance(reply, ErrorReply) and "token" in reply.reason
    assert server.refused_registrations == 3
    assert registered(server).ranks == [genuine]


@pytest.mark.parametrize(
    "address", ["not-an-endpoint", "tcp://[bad", "tcp://host:0", "tcp://host:65536", "tcp://h:1 "]
)
def test_malformed_control_addresses_are_refused_at_the_door(server, address):
    frame = raw_frame(RegisterRank(info(), server.token), control_address=address)
    with pytest.raises(WireError, match="control_address"):
        CODEC.decode(frame)
    reply = exchange(server.address, [frame])
    assert isinstance(reply, ErrorReply) and "control_address" in reply.reason
    assert not server.ranks
    room = RegisterRoom(1, layout_for(4, 1, 0), b"ucx", "tcp://127.0.0.1:9", 1, 8, 8, "staged")
    with pytest.raises(WireError, match="control_address"):
        CODEC.decode(raw_frame(room, control_address=address))
    with pytest.raises(WireError, match="control_address"):
        CODEC.decode(raw_frame(Peers([info()]), control_address=address))


def test_check_ranks_refuses_malformed_addresses_however_they_arrived():
    rank = info()
    msgspec.structs.force_setattr(rank, "control_address", "tcp://[bad")
    for ranks, fragment in (
        ([rank], "control_address"),
        ([], "no prefill ranks"),
        ([info(tp=2)], "groups of [2]"),
    ):
        failure = check_ranks(layout_for(4, 1, 0), ranks)
        assert fragment in failure.detail
        assert failure.kind is FailureKind.BAD_MESSAGE


def test_multipart_frames_get_an_error_and_the_server_keeps_serving(server):
    reply = exchange(server.address, [b"x"] * 1000)
    assert isinstance(reply, ErrorReply) and "got 1000" in reply.reason
    assert server.bad_frames == 1
    assert isinstance(registered(server), ErrorReply)  # still answering: no rank yet


def test_oversized_frames_are_dropped_before_they_are_read(server):
    assert exchange(server.address, [b"\x00" * 10_000], timeout_ms=200) is None
    assert server.bad_frames == 0  # ZeroMQ refused it: it never reached the server
    assert isinstance(registered(server), ErrorReply)


def test_submissions_name_their_sender():
    seen = []
    srv = BootstrapServer(1, on_submit=lambda message, peer: seen.append(peer) or Ack())
    try:
        assert isinstance(request(CTX, CODEC, srv.address, SubmitPrompt(7, [1, 2]), 5), Ack)
    finally:
        srv.close()
    assert seen == ["127.0.0.1"]


class FakeBootstrap:
    """A ROUTER answering every request with `answer` (whatever bytes it is given)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.socket = CTX.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if self.socket.poll(20):
                identity, _ = self.socket.recv_multipart()
                self.socket.send_multipart([identity, self.answer])

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage",
        raw_frame(Peers([info()]), control_address="not-an-endpoint"),
        raw_frame(Peers([info()]), control_address="tcp://[bad"),
        CODEC.encode(Peers([])),
    ],
    ids=["garbage", "not-an-endpoint", "bad-host", "no-ranks"],
)
def test_a_bootstrap_answering_garbage_fails_the_room_not_the_decode_rank(answer):
    fake = FakeBootstrap(answer)
    dep = Deployment(4, 1, 1, config=small_config())
    try:
        agent, cache = dep.decode.agents[0], dep.decode.caches[0]
        req = Request(dep.prefill.layouts[0], 16, seed=3, offset=100)
        receiver = agent.receiver(req.room, req_slots(cache, req), fake.address)
        assert wait_all([receiver]) == [KVPoll.Failed]
        failure = receiver.failure
        assert failure.detail.startswith(("bootstrap failed", "invalid"))
        assert failure.kind in (FailureKind.PEER_LOST, FailureKind.BAD_MESSAGE)
        assert agent.core.loop.alive
        req, senders, receivers = dep.run(num_tokens=24)  # the rank still serves real rooms
        assert wait_all(senders + receivers) == [KVPoll.Success] * 2
    finally:
        dep.close()
        fake.close()


def test_a_frame_whose_handling_raises_does_not_stop_the_server():
    srv = BootstrapServer(1, on_submit=lambda message, peer: object())  # cannot be encoded
    try:
        sock = CTX.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.address)
        sock.send(CODEC.encode(SubmitPrompt(7, [1, 2])))
        reply = request(CTX, CODEC, srv.address, QueryPeers(), 5)  # answered after it
        assert isinstance(reply, ErrorReply) and "0 of 1" in reply.reason
        assert srv.failed_frames == 1
        sock.close()
    finally:
        srv.close()
