"""A prefill rank accepts a decode rank's registration in its next heartbeat, not in a frame of
its own; a registration no prefill rank accepts fails at the bootstrap deadline, and only the
room's own prefill ranks can accept it."""

import pytest
import zmq

from kvferry.transport.messages import Codec, Heartbeat
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Deployment,
    Request,
    prefill_fill,
    small_config,
    start_receivers,
    start_senders,
    wait_all,
    wait_for,
)

CODEC = Codec()


def registered_room(dep, seed=1):
    """A decode room registered with every prefill rank (sent), its prefill side idle."""
    req = Request(dep.prefill.layouts[0], 32, seed=seed)
    prefill_fill(dep.prefill, req)
    receivers = start_receivers(dep.decode, req, dep.server.address)
    assert wait_for(lambda: receivers[0].poll() >= KVPoll.WaitingForInput), "not registered"
    return req, receivers, dep.decode.agents[0].rooms[req.room]


def test_every_prefill_rank_accepts_in_a_heartbeat_and_the_room_moves():
    dep = Deployment(4, 2, 1)
    try:
        req, receivers, room = registered_room(dep)
        assert wait_for(lambda: room.all_accepted), "not accepted by both prefill ranks"
        assert room.accepted == set(room.rank_peers.values())
        beats = [agent.core.stats for agent in dep.prefill.agents]
        assert all(stats.bad_frames == 0 for stats in beats)
        assert wait_all(start_senders(dep.prefill, req) + receivers) == [KVPoll.Success] * 3
    finally:
        dep.close()


def test_a_registration_never_accepted_fails_at_the_bootstrap_deadline(monkeypatch):
    # the prefill rank takes the registration, but its acceptance never reaches decode
    dep = Deployment(4, 1, 1, config=small_config(bootstrap_timeout_s=0.5))
    try:
        monkeypatch.setattr(dep.prefill.agents[0].core, "accept", lambda peer, room: None)
        req, receivers, room = registered_room(dep)
        # claimed by its engine (no prefill-side bootstrap deadline), its KV not ready yet
        senders = [agent.sender(req.room, req.num_tokens) for agent in dep.prefill.agents]
        assert wait_all(receivers, timeout_s=10) == [KVPoll.Failed]
        assert "not registered with every prefill rank" in str(receivers[0].failure)
        assert not room.accepted
        # the prefill side hears of it: its room fails too
        assert wait_all(senders, timeout_s=10) == [KVPoll.Failed]
        assert "aborted by decode" in str(senders[0].failure)
    finally:
        dep.close()


@pytest.mark.parametrize("identity", [None, b"tcp://127.0.0.1:9"])
def test_a_heartbeat_accepts_only_the_rooms_its_sender_was_asked_to(identity):
    dep = Deployment(4, 1, 1, config=small_config(bootstrap_timeout_s=0.5))
    try:
        req, receivers, room = registered_room(dep)
        rogue = zmq.Context.instance().socket(zmq.DEALER)
        if identity is not None:
            rogue.setsockopt(zmq.IDENTITY, identity)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(dep.decode.agents[0].core.control.address)
        # the room, unknown rooms and the largest room id: none is the rogue's to accept
        rogue.send(CODEC.encode(Heartbeat([req.room, 12345, (1 << 64) - 1])))
        rogue.send(b"junk")  # read after the heartbeat: once it is counted, both were
        stats = dep.decode.agents[0].core.stats
        assert wait_for(lambda: stats.bad_frames == 1), "the junk behind the heartbeat unread"
        assert all(peer in room.rank_peers.values() for peer in room.accepted)
        rogue.close()
        assert wait_all(start_senders(dep.prefill, req) + receivers) == [KVPoll.Success] * 2
    finally:
        dep.close()
