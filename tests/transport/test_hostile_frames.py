"""Frames from strangers on a control port: answered over their own connection or dropped,
never able to stop a rank's transfer thread or to grow its state, sockets or log without bound."""

import logging
import os

import msgspec
import zmq

from kvferry.transport.dataplane import InvalidAddress
from kvferry.transport.failure import FailureKind, aborted
from kvferry.transport.log_limit import RateLimitedLog
from kvferry.transport.loopback import LoopbackDataPlane
from kvferry.transport.messages import Abort, Codec, ErrorReply, RegisterRoom
from kvferry.transport.room import KVPoll
from kvferry.transport.tombstones import Tombstones
from support.transfer_sim import layout_for, small_config, wait_all, wait_for

CODEC = Codec()


class StrictLoopback(LoopbackDataPlane):
    """Refuses addresses of no live loopback plane, as the UCX plane refuses malformed ones."""

    def _connect(self, address, on_error):
        if address not in self._registry:
            raise InvalidAddress(f"no loopback plane at {address[:32]!r}")
        return address


def registration(room=5, control_address="tcp://127.0.0.1:9", **changes):
    fields = dict(
        room=room,
        layout=layout_for(4, 1, 0),
        ucx_address=b"x",
        control_address=control_address,
        recv_key=1,
        num_tokens=10,
        chunk_tokens=16,
        mode="staged",
    )
    fields.update(changes)
    return RegisterRoom(**fields)


def stranger(address, identity=None):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 2000)  # deliver before closing
    sock.connect(address)
    return sock


def answer(sock, timeout_s=5.0):
    """The one frame that comes back to `sock`, decoded; None if nothing does in time."""
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return CODEC.decode(sock.recv())


def forged(message, path, value):
    """`message` encoded, with the field at `path` set to `value` (which a local Struct would
    refuse to hold)."""
    body = msgspec.msgpack.decode(CODEC.encode(message)[2:])
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return CODEC.encode(message)[:2] + msgspec.msgpack.encode(body)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def serves_a_room(dep, seed):
    _, senders, receivers = dep.run(num_tokens=20, seed=seed)
    return wait_all(senders + receivers) == [KVPoll.Success] * (len(senders) + len(receivers))


def test_default_identity_registration_is_answered_and_the_rank_keeps_serving(deployments):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address)  # ZeroMQ's own identity: no address at all
    sock.send(CODEC.encode(registration(num_tokens=0)))
    reply = answer(sock)
    assert isinstance(reply, ErrorReply) and "control_address" in reply.reason
    sock.close()
    assert agent.core.loop.alive
    assert agent.core.control.open_peers == 0
    assert serves_a_room(dep, seed=1)


def test_bad_ucx_address_refuses_the_room_and_leaves_nothing_open(deployments):
    dep = deployments(4, 1, 1, data_plane=StrictLoopback)
    agent = dep.prefill.agents[0]
    peer = "tcp://127.0.0.1:9"
    sock = stranger(agent.core.control.address, peer)
    sock.send(CODEC.encode(registration(room=7, ucx_address=b"\x01garbage")))
    reply = answer(sock)
    assert isinstance(reply, ErrorReply) and "ucx_address" in reply.reason
    assert reply.room == 7
    sock.close()
    assert not agent.core.control.is_open(peer) and len(agent.core.peers) == 0
    assert agent.core.loop.alive
    assert serves_a_room(dep, seed=2)


def test_a_message_whose_handling_raises_fails_only_its_room(deployments, monkeypatch):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    handle = agent.sender(11, 10)

    def broken(peer, message):
        raise RuntimeError("handler bug")

    monkeypatch.setattr(agent.core, "_on_message", broken)
    sock = stranger(agent.core.control.address)
    sock.send(CODEC.encode(registration(room=11)))
    assert wait_all([handle], timeout_s=5) == [KVPoll.Failed]
    assert "internal error: RuntimeError: handler bug" in str(handle.failure)
    sock.close()
    assert agent.core.stats.internal_errors == 1
    monkeypatch.undo()
    assert agent.core.loop.alive
    assert serves_a_room(dep, seed=3)


def test_huge_tp_size_is_refused_on_decode_without_planning(deployments):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address)
    sock.send(forged(registration(), ("layout", "tp_size"), 1 << 20))
    reply = answer(sock)
    assert isinstance(reply, ErrorReply) and "tp_size=1048576" in reply.reason
    sock.close()
    assert 5 not in agent.rooms
    assert serves_a_room(dep, seed=4)


def test_forged_identities_open_a_bounded_number_of_sockets(deployments):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    assert serves_a_room(dep, seed=5)  # the real decode rank is a peer from now on
    agent.core.control.max_peers = 16
    before = fd_count()
    for batch in range(0, 2000, 100):  # at most 100 of this test's own sockets open at once
        socks = []
        for i in range(batch, batch + 100):
            peer = f"tcp://127.0.0.1:{20000 + i}"  # registrations from no real rank
            invalid = {} if i % 2 else {"num_tokens": 0}
            socks.append(stranger(agent.core.control.address, peer))
            socks[-1].send(
                CODEC.encode(registration(room=1000 + i, control_address=peer, **invalid))
            )
        seen = range(1000 + batch, 1100 + batch)
        assert wait_for(
            lambda seen=seen: all(r in agent.rooms or r in agent.tombstones for r in seen)
        )
        for sock in socks:
            sock.close(linger=0)
    assert agent.core.control.peers_refused >= 1000 - 16
    assert agent.core.control.open_peers <= 16
    # 16 outbound sockets' descriptors; strangers' connections close as they go
    assert wait_for(lambda: fd_count() - before < 100), fd_count() - before
    assert agent.core.loop.alive
    assert serves_a_room(dep, seed=6)


def test_forged_registrations_hold_a_bounded_number_of_endpoints(deployments):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    data = agent.core.data
    data.max_endpoints = 8
    peer = "tcp://127.0.0.1:9"
    sock = stranger(agent.core.control.address, peer)
    for i in range(20):  # well-formed addresses, each distinct
        forged_room = registration(room=100 + i, control_address=peer, ucx_address=b"ep%d" % i)
        sock.send(CODEC.encode(forged_room))
    replies = [answer(sock) for _ in range(12)]
    assert all(isinstance(r, ErrorReply) for r in replies), replies
    assert all("8 data-plane endpoints" in r.reason for r in replies)
    assert sorted(r.room for r in replies) == list(range(108, 120))
    assert data.open_endpoints == 8
    for i in range(8):  # the rooms holding them end: the endpoints are idle, not closed yet
        sock.send(CODEC.encode(Abort(100 + i, "done")))
    assert wait_for(lambda: all(100 + i not in agent.rooms for i in range(8)))
    assert data.open_endpoints == 8
    assert serves_a_room(dep, seed=8)  # the longest idle endpoint made room for a real rank
    assert data.open_endpoints == 8
    sock.close()


def test_an_endpoint_is_reused_while_rooms_come_and_closed_once_idle(deployments):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    assert serves_a_room(dep, seed=9) and serves_a_room(dep, seed=10)
    assert agent.core.data.open_endpoints == 1  # the second room reused the first's
    agent.endpoints.idle_s = 0.0
    assert wait_for(lambda: agent.core.data.open_endpoints == 0)
    assert serves_a_room(dep, seed=11)  # opened afresh


def test_oversized_frame_is_refused_unread(deployments):
    dep = deployments(4, 1, 1, config=small_config(max_frame_bytes=4096))
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address)
    sock.send(b"\x00\x03" + b"x" * 5000)  # past the limit: the connection is dropped
    assert answer(sock, timeout_s=1.0) is None
    assert agent.core.stats.bad_frames == 0  # never read
    sock.send_multipart([b"a", b"b", b"c"])  # ZeroMQ reconnects; parts are counted
    reply = answer(sock)
    assert isinstance(reply, ErrorReply) and "got 3" in reply.reason
    sock.close()
    assert serves_a_room(dep, seed=7)


def test_aborts_for_unknown_rooms_keep_a_bounded_tombstone_list(deployments):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    agent.tombstones.limit = 100
    sock = stranger(agent.core.control.address, "tcp://127.0.0.1:9")
    for room in range(1000):
        sock.send(CODEC.encode(Abort(room, "nothing")))
    sock.send(CODEC.encode(Abort(5000, "last")))
    assert wait_for(lambda: 5000 in agent.tombstones)
    assert len(agent.tombstones) == 100
    assert len(agent.core.peers) == 0  # a stranger's frames leave no liveness entry
    sock.close()


def test_unclaimed_rooms_are_purged_at_the_bootstrap_timeout(deployments):
    dep = deployments(4, 1, 1, config=small_config(bootstrap_timeout_s=0.3))
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address, "tcp://127.0.0.1:9")
    sock.send(CODEC.encode(registration(room=21)))
    assert wait_for(lambda: 21 in agent.rooms or 21 in agent.tombstones)
    assert wait_for(lambda: 21 not in agent.rooms)
    assert agent.tombstones.reason(21).kind is FailureKind.TIMEOUT
    assert wait_for(lambda: len(agent.core.peers) == 0)
    sock.close()


def test_bad_frames_are_counted_and_logged_at_a_limited_rate(deployments, caplog):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address)
    with caplog.at_level(logging.WARNING, logger="kvferry.transport.core"):
        for _ in range(200):
            sock.send(b"junk")
        assert wait_for(lambda: agent.core.stats.bad_frames == 200)
    sock.close()
    assert len([r for r in caplog.records if "refused a frame" in r.message]) == 1


def test_refused_registrations_are_counted_and_logged_at_a_limited_rate(deployments, caplog):
    dep = deployments(4, 1, 1)
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address)
    with caplog.at_level(logging.INFO, logger="kvferry.transport"):
        for room in range(1, 101):  # each opens a room, refused (and the room failed)
            sock.send(CODEC.encode(registration(room, mode="slice")))
        assert wait_for(lambda: sum(agent.core.stats.failures.values()) == 100)
    sock.close()
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]


def test_rate_limited_log_says_how_many_lines_it_left_out(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("kvferry.test"), 10.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kvferry.test"):
        assert limited.warning("a", "first %d", 1)
        now[0] = 9.0
        assert not limited.warning("a", "second")
        assert limited.warning("b", "other kind")
        now[0] = 10.0
        assert limited.warning("a", "third")
    assert [r.getMessage() for r in caplog.records] == [
        "first 1",
        "other kind",
        "third (1 more suppressed)",
    ]


def test_tombstones_forget_the_oldest_first_and_expire_from_the_oldest_end():
    tombs = Tombstones(keep_s=10.0, limit=3)
    for room in range(4):
        tombs.bury(room, aborted(f"reason {room}"), now=float(room))
    assert 0 not in tombs and len(tombs) == 3
    tombs.expire(now=12.5)  # rooms 1 and 2 are older than 10 s
    assert [r for r in range(4) if r in tombs] == [3]
    assert tombs.pop(3) == aborted("reason 3") and tombs.pop(3) is None
