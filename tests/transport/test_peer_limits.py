"""Rooms one decode rank may hold on a prefill rank, and of those rooms registered ahead of any
prompt: past either limit its registrations are refused over its own connection, counted by
limit, and every other peer is served as before."""

import zmq

from kvferry.transport.messages import Codec, ErrorReply, RegisterRoom
from kvferry.transport.room import KVPoll
from support.transfer_sim import layout_for, small_config, wait_all, wait_for

CODEC = Codec()
PEER = "tcp://127.0.0.1:9"  # a closed port: only refusals come back, over the connection


def registration(room):
    layout = layout_for(4, 1, 0)
    return RegisterRoom(room, layout, b"x", PEER, 1, 10, 16, "staged")


def stranger(address):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, PEER.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    return sock


def answer(sock, timeout_s=5.0):
    return CODEC.decode(sock.recv()) if sock.poll(int(timeout_s * 1000)) else None


def serves_a_room(dep, seed):
    _, senders, receivers = dep.run(num_tokens=20, seed=seed)
    return wait_all(senders + receivers) == [KVPoll.Success] * (len(senders) + len(receivers))


def refusals(sock, count):
    replies = [answer(sock) for _ in range(count)]
    assert all(isinstance(r, ErrorReply) for r in replies), replies
    assert answer(sock, timeout_s=0.5) is None  # nothing else was refused
    return replies


def test_registrations_ahead_of_prompts_are_bounded_per_peer(deployments):
    dep = deployments(4, 1, 1, config=small_config(max_pending_rooms_per_peer=4))
    agent = dep.prefill.agents[0]
    sock = stranger(agent.core.control.address)
    for room in range(100, 107):
        sock.send(CODEC.encode(registration(room)))
    replies = refusals(sock, 3)
    assert sorted(r.room for r in replies) == [104, 105, 106]
    assert all("max_pending_rooms_per_peer=4" in r.reason for r in replies)
    assert [r for r in range(100, 107) if r in agent.rooms] == [100, 101, 102, 103]
    assert agent.core.stats.limit_refusals == {"max_pending_rooms_per_peer": 3}
    assert agent.stats().limit_refusals == {"max_pending_rooms_per_peer": 3}
    assert serves_a_room(dep, seed=1)  # another peer is served
    sock.close()


def test_rooms_per_peer_are_bounded_even_when_prompts_claim_them(deployments):
    config = small_config(max_rooms_per_peer=3, max_pending_rooms_per_peer=1)
    dep = deployments(4, 1, 1, config=config)
    agent = dep.prefill.agents[0]
    rooms = range(200, 205)
    handles = [agent.sender(room, 10) for room in rooms]  # the engine holds their prompts
    assert wait_for(lambda: all(r in agent.rooms for r in rooms))
    sock = stranger(agent.core.control.address)
    for room in rooms:
        sock.send(CODEC.encode(registration(room)))
    replies = refusals(sock, 2)
    assert sorted(r.room for r in replies) == [203, 204]
    assert all("max_rooms_per_peer=3" in r.reason for r in replies)
    assert sorted(agent.core.peers.rooms_of(PEER)) == [200, 201, 202]
    assert agent.core.stats.limit_refusals == {"max_rooms_per_peer": 2}
    assert serves_a_room(dep, seed=2)
    sock.close()
    assert len(handles) == 5
