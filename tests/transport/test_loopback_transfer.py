"""End-to-end transfers between in-process agents over the loopback data plane."""

import pytest

from kvferry.transport.room import KVPoll
from kvsim import TP_PAIRS
from transfer_sim import Deployment, decode_matches, wait_all, wait_idle


@pytest.mark.parametrize("heads, src_tp, dst_tp", TP_PAIRS)
def test_heads_arrive_bit_exact(heads, src_tp, dst_tp):
    dep = Deployment(heads, src_tp, dst_tp, d_page_size=4)
    try:
        req, senders, receivers = dep.run(num_tokens=45)
        states = wait_all(senders + receivers)
        assert states == [KVPoll.Success] * len(states), [
            h.failure_reason for h in senders + receivers
        ]
        assert decode_matches(dep.decode, req)
        assert all(r.first_token == 42 for r in receivers)
        assert wait_idle([dep.prefill, dep.decode])
    finally:
        dep.close()
