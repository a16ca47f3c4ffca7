"""The agents' engine-facing snapshot: `stats()` reads what daemons export without reaching into
the agent's core."""

import dataclasses

import pytest

from kvferry.transport.room import KVPoll
from support.transfer_sim import Deployment, wait_all, wait_for, wait_idle


def test_stats_after_one_transfer():
    dep = Deployment(4, 2, 1, d_page_size=4)
    try:
        _, senders, receivers = dep.run(num_tokens=45)
        assert wait_all(senders + receivers) == [KVPoll.Success] * 3
        assert wait_idle([dep.prefill, dep.decode])
        agents = dep.prefill.agents + dep.decode.agents
        # a room counts as succeeded on the loop thread just after its handle sees Success
        assert wait_for(lambda: all(a.stats().rooms_succeeded == 1 for a in agents))
        prefill = [a.stats() for a in dep.prefill.agents]
        decode = [a.stats() for a in dep.decode.agents]
    finally:
        dep.close()
    assert sum(s.bytes_sent for s in prefill) == sum(s.bytes_received for s in decode) > 0
    assert sum(s.messages_sent for s in prefill) == sum(s.messages_received for s in decode)
    for s in prefill + decode:
        assert set(s.rooms) == {state.name for state in KVPoll}
        assert s.ring_used == 0 and s.ring_capacity > 0
        assert s.failures == {} and s.bad_frames == 0 and s.internal_errors == 0
        assert s.control_address.startswith("tcp://")
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.rooms_succeeded = 2


def test_stats_count_open_rooms_by_state():
    dep = Deployment(2, 1, 1)
    try:
        dep.prefill.agents[0].sender(7, 10)  # no decode rank registers it: it stays put
        agent = dep.prefill.agents[0]
        assert wait_for(lambda: sum(agent.stats().rooms.values()) == 1)
        assert agent.stats().rooms[KVPoll.Bootstrapping.name] == 1
        assert agent.thread_failure is None
    finally:
        dep.close()
