"""Layer-wise transfer over the loopback plane: each layer group leaves once the forward has
queued its layers, the last group tapered down to one layer."""

import pytest

from kvferry.transport.handles import KVWritten
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Deployment,
    Request,
    decode_matches,
    prefill_fill,
    req_slots,
    settle,
    small_config,
    start_receivers,
    wait_all,
    wait_for,
    wait_idle,
)


def _handed_over_unwritten(dep: Deployment, seed: int):
    """A one-chunk room registered and handed over by prefill rank 0 with a KVWritten that
    announces nothing yet (the forward not queued): (request, receivers, sender, written)."""
    req = Request(dep.prefill.layouts[0], 16, seed=seed)
    receivers = start_receivers(dep.decode, req, dep.server.address)
    agent, cache = dep.prefill.agents[0], dep.prefill.caches[0]
    sender = agent.sender(req.room, req.num_tokens)
    assert wait_for(lambda: sender.poll() == KVPoll.WaitingForInput)
    written = KVWritten()
    sender.add_tokens(req_slots(cache, req), written=written, last=True)
    return req, receivers, sender, written


def test_layer_groups_leave_as_soon_as_the_forward_has_queued_them():
    """A prefill engine hands a chunk over before it launches the forward (a KVWritten it fills
    in meanwhile): nothing leaves until a layer group is announced, then that group's messages
    do while the rest wait for the forward; the first token follows on its own."""
    config = small_config(layer_group=1)  # three layers: three messages per chunk and writer
    dep = Deployment(2, 1, 1, config=config, layers=3, d_page_size=4)
    try:
        req, receivers, sender, written = _handed_over_unwritten(dep, seed=3)
        agent, sent = dep.prefill.agents[0], dep.prefill.agents[0].core.data
        assert settle([agent]) and sent.messages_sent == 0  # no layer is queued yet
        prefill_fill(dep.prefill, req)  # the forward: the KV is written, then announced
        written.layers_written(1, None)
        agent.wake()  # as the engine does after each layer group
        assert wait_for(lambda: sent.messages_sent == 1)  # layer 0 has left, 1 and 2 wait
        assert settle([agent]) and sent.messages_sent == 1
        written.complete(None)
        agent.wake()
        assert wait_for(lambda: sent.messages_sent == 3)
        assert settle([agent]) and sender.poll() == KVPoll.Transferring  # no first token yet
        sender.first_token_is(42)
        assert wait_all([sender, *receivers]) == [KVPoll.Success] * 2
        assert decode_matches(dep.decode, req) and receivers[0].first_token == 42
        assert wait_idle([dep.prefill, dep.decode])
    finally:
        dep.close()


@pytest.mark.parametrize("taper", [True, False])
def test_a_tapered_last_group_leaves_layer_by_layer(taper):
    """Six layers in groups of four: with the last group tapered ([0, 4), [4, 5), [5, 6)) layer
    4 leaves as soon as it is announced, before the forward's end; uniform ([0, 4), [4, 6)) it
    waits for layer 5. Either way the KV arrives bit-exact."""
    config = small_config(layer_group=4, layer_taper=taper)
    dep = Deployment(2, 1, 1, config=config, layers=6, d_page_size=4)
    try:
        req, receivers, sender, written = _handed_over_unwritten(dep, seed=5)
        agent, sent = dep.prefill.agents[0], dep.prefill.agents[0].core.data
        prefill_fill(dep.prefill, req)
        for layers, messages in ((4, 1), (5, 2 if taper else 1)):
            written.layers_written(layers, None)
            agent.wake()
            assert wait_for(lambda n=messages: sent.messages_sent == n)
            assert settle([agent]) and sent.messages_sent == messages
        written.complete(None)
        agent.wake()
        assert wait_for(lambda: sent.messages_sent == (3 if taper else 2))
        sender.first_token_is(7)
        assert wait_all([sender, *receivers]) == [KVPoll.Success] * 2
        assert decode_matches(dep.decode, req)
        assert wait_idle([dep.prefill, dep.decode])
    finally:
        dep.close()
