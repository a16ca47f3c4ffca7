"""Bytes per message on the ZeroMQ sockets: a message of more than `max_frame_bytes` in all,
split into parts each under the limit, is refused with an error naming the limit and counted
as that limit's refusal; a part over the limit is dropped by ZeroMQ unread (its connection
with it); the socket keeps serving."""

import zmq

from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.control import request
from kvferry.transport.messages import Codec, ErrorReply, FrameTooLarge, QueryPeers
from support.transfer_sim import small_config

LIMIT = 4096
CODEC = Codec(LIMIT)
CTX = zmq.Context.instance()


def dealer(address: str) -> zmq.Socket:
    sock = CTX.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def answer(sock) -> object:
    assert sock.poll(5000), "no answer"
    return CODEC.decode(sock.recv())


def test_the_codec_names_the_limit():
    frame = b"\x00" * (LIMIT + 1)
    try:
        CODEC.decode(frame)
    except FrameTooLarge as exc:
        assert f"limit of {LIMIT} (max_frame_bytes)" in str(exc)
    else:
        raise AssertionError("a frame over the limit was decoded")


def test_a_rank_refuses_and_counts_a_message_over_the_limit(deployments):
    dep = deployments(4, 1, 1, config=small_config(max_frame_bytes=LIMIT))
    agent = dep.prefill.agents[0]
    sock = dealer(agent.core.control.address)
    sock.send_multipart([b"x" * 3000, b"y" * 3000])  # each part fits; together they do not
    reply = answer(sock)
    assert isinstance(reply, ErrorReply) and f"max_frame_bytes={LIMIT}" in reply.reason
    sock.send_multipart([b"x" * 10, b"y" * 10])  # several parts, but small: not this limit
    assert "expected 1 frame" in answer(sock).reason
    assert agent.stats().limit_refusals == {"max_frame_bytes": 1}
    sock.close()


def test_the_bootstrap_server_refuses_and_counts_a_message_over_the_limit():
    srv = BootstrapServer(tp_size=1, max_frame_bytes=LIMIT)
    try:
        sock = dealer(srv.address)
        sock.send_multipart([b"x" * 3000, b"y" * 3000])
        reply = answer(sock)
        assert isinstance(reply, ErrorReply) and f"max_frame_bytes={LIMIT}" in reply.reason
        sock.send_multipart([b"x" * 10, b"y" * 10])
        assert "expected 1 frame" in answer(sock).reason
        assert srv.counters()["oversized_frames"] == 1 and srv.counters()["bad_frames"] == 2
        served = request(CTX, CODEC, srv.address, QueryPeers(), 5)  # answered as ever
        assert isinstance(served, ErrorReply) and "ranks registered" in served.reason
        sock.close()
    finally:
        srv.close()
