"""End-to-end transfers between in-process agents over the loopback data plane."""

import pytest

from kvferry.staging.plan import plan_head_transfers
from kvferry.transport.room import KVPoll
from support.kvsim import TP_PAIRS
from support.transfer_sim import Deployment, decode_matches, small_config, wait_all, wait_idle


def _transfer_ok(dep: Deployment, num_tokens: int) -> None:
    req, senders, receivers = dep.run(num_tokens=num_tokens)
    states = wait_all(senders + receivers)
    assert states == [KVPoll.Success] * len(states), [str(h.failure) for h in senders + receivers]
    assert decode_matches(dep.decode, req)
    assert all(r.first_token == 42 for r in receivers)
    assert wait_idle([dep.prefill, dep.decode])


@pytest.mark.parametrize("heads, src_tp, dst_tp", TP_PAIRS)
def test_heads_arrive_bit_exact(heads, src_tp, dst_tp):
    dep = Deployment(heads, src_tp, dst_tp, d_page_size=4)
    try:
        _transfer_ok(dep, num_tokens=45)
    finally:
        dep.close()


@pytest.mark.parametrize("layer_group, groups", [(1, 3), (2, 2), (3, 1), (7, 1)])
@pytest.mark.parametrize("heads, src_tp, dst_tp", [(4, 2, 1), (2, 1, 4), (8, 4, 2)])
def test_layer_wise_messages_arrive_bit_exact(heads, src_tp, dst_tp, layer_group, groups):
    """Three layers in groups of `layer_group`: one message per (chunk, group, writer pair)."""
    config = small_config(layer_group=layer_group)
    dep = Deployment(heads, src_tp, dst_tp, config=config, layers=3, d_page_size=4)
    try:
        _transfer_ok(dep, num_tokens=45)
        sent = sum(agent.core.data.messages_sent for agent in dep.prefill.agents)
        pairs = len(plan_head_transfers(heads, src_tp, dst_tp))
        assert sent == -(-45 // config.chunk_tokens) * groups * pairs
    finally:
        dep.close()


def test_layer_wise_mla_latent_arrives_bit_exact():
    config = small_config(layer_group=2)
    dep = Deployment(1, 2, 2, config=config, layers=3, mla=True, head_dim=32)
    try:
        _transfer_ok(dep, num_tokens=20)
    finally:
        dep.close()
