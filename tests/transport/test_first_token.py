"""A prefill rank's first token: read for TransferDone only once the copy that fills it has
run, and a draw that failed (known with the token) fails the room on both sides."""

import time

import pytest
import torch

from kvferry.staging.copy_stream import Fence
from kvferry.transport.handles import KVWritten
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Deployment,
    Request,
    decode_matches,
    prefill_fill,
    req_slots,
    settle,
    start_receivers,
    wait_all,
    wait_for,
    wait_idle,
)


class _PendingFence:
    """A forward's fence that fires when the test says (as the device would, later)."""

    handle = 0
    event = None

    def __init__(self) -> None:
        self.fired = False

    def done(self) -> bool:
        return self.fired


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_first_token_is_read_only_once_the_copy_that_fills_it_has_run(device):
    """The engine hands over its first token as a host tensor that a copy queued after the
    forward fills, and returns while the device still runs the forward. A prefill rank reads
    it for TransferDone only once that copy has run: on a rank that sends the room nothing
    (MLA, prefill TP 2 to decode TP 1: rank 1's latent is rank 0's to send) no gather waits for
    it, and a rank that sends waits too. On a CPU the test holds the copy back and lets it go;
    on a GPU the copy follows a long kernel, and the copy stream wakes the rank once it ran."""
    dep = Deployment(1, 2, 1, mla=True, head_dim=32, device=device)
    try:
        req = Request(dep.prefill.layouts[0], 16, seed=5)
        receivers = start_receivers(dep.decode, req, dep.server.address)
        agents = dep.prefill.agents
        senders = [agent.sender(req.room, req.num_tokens) for agent in agents]
        assert wait_for(lambda: all(s.poll() == KVPoll.WaitingForInput for s in senders))
        prefill_fill(dep.prefill, req)
        fence, token = _first_token_copy(device)
        for sender, cache in zip(senders, dep.prefill.caches, strict=True):
            written = KVWritten()
            sender.add_tokens(req_slots(cache, req), written=written, last=True)
            written.fence, written.at = fence, time.time()  # the forward is queued
            sender.first_token_is(token)
        if device == "cpu":
            assert settle(agents + dep.decode.agents)
            assert [s.poll() for s in senders] == [KVPoll.Transferring, KVPoll.WaitingForInput]
            assert receivers[0].poll() != KVPoll.Success  # no TransferDone yet
            token[0], fence.fired = 42, True  # the copy has run
            for agent in agents:
                agent.wake()
        assert wait_all([*senders, *receivers]) == [KVPoll.Success] * 3
        assert receivers[0].first_token == 42
        assert decode_matches(dep.decode, req)
        assert wait_idle([dep.prefill, dep.decode])
    finally:
        dep.close()


def _first_token_copy(device: str):
    """(fence, host tensor): the token 42 lands in the tensor once the fence fires — when the
    test says on a CPU, after a ~0.1 s kernel on a GPU."""
    if device == "cpu":
        return _PendingFence(), torch.zeros(1, dtype=torch.int64)
    sampled = torch.full((1,), 42, dtype=torch.int64, device=device)
    host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    torch.cuda._sleep(200_000_000)  # the rest of the forward
    host.copy_(sampled, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return Fence(event), host


def test_a_first_token_whose_draw_failed_fails_the_room_on_both_sides():
    """A draw made on the device is known to have failed only with the token: the prefill rank
    fails the room then, for the engine's reason, and tells the decode rank."""
    dep = Deployment(2, 1, 1, d_page_size=4)
    try:
        req = Request(dep.prefill.layouts[0], 16, seed=3)
        receivers = start_receivers(dep.decode, req, dep.server.address)
        agent, cache = dep.prefill.agents[0], dep.prefill.caches[0]
        sender = agent.sender(req.room, req.num_tokens)
        assert wait_for(lambda: sender.poll() == KVPoll.WaitingForInput)
        prefill_fill(dep.prefill, req)
        written = KVWritten()
        sender.add_tokens(req_slots(cache, req), written=written, last=True)
        written.complete(None)
        why = "sampling failed: logits are not finite"
        sender.first_token_is(torch.tensor(7), failed=torch.tensor(True), why=why)
        assert wait_all([sender, *receivers]) == [KVPoll.Failed] * 2
        assert why in str(sender.failure) and why in str(receivers[0].failure)
        assert wait_idle([dep.prefill, dep.decode])
    finally:
        dep.close()
