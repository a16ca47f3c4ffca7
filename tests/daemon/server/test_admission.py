"""A prefill daemon computes a prompt before a decode rank has registered its room only within
its budget of unregistered tokens, holds the others until then, and bounds the prompts per
submitting peer that wait for it."""

import select
import time

import pytest
import zmq

from kvferry.daemon.engine.group import TPGroup, Verdict
from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection
from kvferry.daemon.server.prompt_quota import PromptQuota
from kvferry.transport.control import request
from kvferry.transport.failure import FailureKind
from kvferry.transport.messages import Ack, Codec, ErrorReply, SubmitPrompt
from kvferry.transport.room import KVPoll
from support.cluster import decode, generate, prefill, running, wait_idle, write
from support.engine_sim import engines, run_until_finished


@pytest.fixture
def tiny():
    config = ModelSection().model_config()
    server, prefill, decode = engines(
        None, model=(config, full_weights(config, None, seed=0)), bootstrap_timeout_s=1.0
    )
    yield server, prefill, decode
    decode.agent.close()
    prefill.agent.close()
    server.close()


def step_idle(prefill, until, timeout_s=10.0):
    """Step the prefill engine, asserting that no forward runs, until `until(progress)`."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert not prefill.step(), "a forward ran for a room nobody registered"
        progress = prefill.take_output()
        if until(progress):
            return progress
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_prompt_nobody_registered_runs_no_forward_and_fails_at_the_timeout(tiny):
    _, prefill, _ = tiny
    prefill.submit(7, list(range(1, 200)), SamplingParams(max_tokens=1))
    assert prefill.queues() == {"registering": 1, "prefilling": 0, "sending": 0}
    progress = step_idle(prefill, lambda p: p.done)
    [done] = progress.done
    assert done.room == 7 and done.error.kind is FailureKind.TIMEOUT
    assert "registration" in done.error.detail
    assert not progress.reserved and not prefill.busy
    assert prefill.runner.blocks.used_pages == 0 and not prefill.scheduler.waiting
    assert prefill.samples.take().forward_s == []


def test_a_held_prompt_runs_once_its_room_is_registered(tiny):
    server, prefill, decode = tiny
    prompt = [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200]
    prefill.submit(1000, prompt, SamplingParams(max_tokens=3))
    step_idle(prefill, lambda p: True)  # held: no forward without the registration
    decode.submit(1000, prompt, SamplingParams(max_tokens=3), bootstrap=server.address)
    outputs = run_until_finished(prefill, decode, 1)
    tokens, finish = outputs[1000]
    assert finish == "length" and len(tokens) == 3
    assert prefill.runner.blocks.used_pages == 0 and decode.runner.blocks.used_pages == 0


def register(decode, prefill, server, room, prompt, max_tokens):
    """Open `room` on decode and step it until every prefill rank has its registration."""
    decode.submit(room, prompt, SamplingParams(max_tokens=max_tokens), bootstrap=server.address)
    deadline = time.monotonic() + 10
    while not prefill.agent.registered(room):
        decode.step()
        assert time.monotonic() < deadline, f"room {room} was not registered"
        wait_for_news(prefill, decode)


def wait_for_news(*engines, timeout_s=0.05):
    """Sleep until a room of one of `engines` changes state, or `timeout_s` passes."""
    bells = [engine.agent.bell for engine in engines]
    select.select(bells, [], [], timeout_s)
    for bell in bells:
        bell.clear()


def test_a_prompt_whose_room_is_already_registered_runs_at_its_first_step(tiny):
    server, prefill, decode = tiny
    prompt = [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200]
    register(decode, prefill, server, 2000, prompt, 2)  # decode's registration comes first
    prefill.submit(2000, prompt, SamplingParams(max_tokens=2))
    assert prefill.step(), "a registered room waited a step for its handle to be claimed"
    tokens, finish = run_until_finished(prefill, decode, 1)[2000]
    assert finish == "length" and len(tokens) == 2


@pytest.fixture
def early():
    """Engines whose prefill computes up to 24 tokens of prompts before their registration."""
    config = ModelSection().model_config()
    model = (config, full_weights(config, None, seed=0))
    server, prefill, decode = engines(
        None, model=model, bootstrap_timeout_s=2.0, unregistered_tokens=24
    )
    yield server, prefill, decode
    decode.agent.close()
    prefill.agent.close()
    server.close()


def test_a_prompt_within_the_budget_computes_before_its_registration_and_arrives_the_same(early):
    server, prefill, decode = early
    prompt = [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200]
    prefill.submit(3000, prompt, SamplingParams(max_tokens=3))
    assert prefill.step(), "a prompt within the budget waited for its registration"
    assert prefill.step() and not prefill.scheduler.waiting  # in chunks of 8 and 4: computed
    assert prefill.runner.blocks.used_pages > 0
    progress = prefill.take_output()
    assert not progress.reserved and not progress.done
    assert prefill.queues() == {"registering": 1, "prefilling": 0, "sending": 0}
    decode.submit(3000, prompt, SamplingParams(max_tokens=3), bootstrap=server.address)
    early_tokens = run_until_finished(prefill, decode, 1)[3000]
    register(decode, prefill, server, 3001, prompt, 3)  # the other order: registered first
    prefill.submit(3001, prompt, SamplingParams(max_tokens=3))
    assert run_until_finished(prefill, decode, 1)[3001] == early_tokens
    assert early_tokens[1] == "length" and len(early_tokens[0]) == 3
    assert prefill.runner.blocks.used_pages == 0 and decode.runner.blocks.used_pages == 0


def test_prompts_past_the_budget_wait_and_an_unregistered_one_frees_it_at_the_timeout(early):
    _, prefill, _ = early
    prefill.submit(1, list(range(1, 21)), SamplingParams(max_tokens=1))  # 20 of 24 tokens
    assert prefill.step()
    time.sleep(0.5)  # so that room 2 times out well after room 1 (2 s each: room 1 is still
    # registering below however slowly the machine runs the forwards in between)
    prefill.submit(2, list(range(1, 11)), SamplingParams(max_tokens=1))  # 10: past the budget
    forwards = 1
    while prefill.scheduler.waiting:
        forwards += prefill.step()
    assert prefill.queues() == {"registering": 2, "prefilling": 0, "sending": 0}
    deadline, done = time.monotonic() + 10, {}
    while len(done) < 2:  # 1 times out; 2 then takes its place in the budget, and times out
        assert time.monotonic() < deadline
        forwards += prefill.step()
        for room in prefill.take_output().done:
            done[room.room] = room.error
        wait_for_news(prefill, timeout_s=0.1)
    assert all(error.kind is FailureKind.TIMEOUT for error in done.values())
    assert list(done) == [1, 2]
    assert forwards == 5  # prompt 1 in chunks of 8, 8, 4; then prompt 2 in 8, 2
    assert prefill.runner.blocks.used_pages == 0 and not prefill.busy


def test_verdicts_hold_a_room_until_every_rank_is_past_bootstrapping():
    states = [KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Success, KVPoll.Failed]
    assert TPGroup().verdicts(states) == [
        Verdict.BOOTSTRAPPING,
        Verdict.WAIT,
        Verdict.SUCCESS,
        Verdict.FAILED,
    ]


def test_quota_bounds_prompts_per_peer_and_in_total():
    quota = PromptQuota(per_peer=2, total=3)
    assert quota.take(1, "10.0.0.1") is None and quota.take(2, "10.0.0.1") is None
    refused = quota.take(3, "10.0.0.1")
    assert "10.0.0.1" in refused and "max_unregistered_prompts_per_peer=2" in refused
    assert quota.take(4, "10.0.0.2") is None
    assert "max_unregistered_prompts=3" in quota.take(5, "10.0.0.3")
    quota.release(1)
    quota.release(1)  # released twice (registered, then done): counted once
    quota.release(99)
    assert quota.take(6, "10.0.0.1") is None and len(quota) == 3


def test_a_prefill_daemon_bounds_the_prompts_one_host_may_leave_unregistered(tmp_path):
    scheduler = {
        "prefill_chunk_tokens": 8,
        "max_batch_tokens": 24,
        "max_unregistered_prompts_per_peer": 2,
    }
    p = prefill("prefill-0", scheduler=scheduler)
    path = write(tmp_path, [p, decode("decode-0", [p])])
    with running(path) as launcher:
        bootstrap = f"tcp://127.0.0.1:{p['bootstrap_port']}"
        ctx, codec = zmq.Context.instance(), Codec()
        replies = [
            request(ctx, codec, bootstrap, SubmitPrompt(room, [1, 2, 3]), 10) for room in (1, 2, 3)
        ]
        assert [type(r) for r in replies] == [Ack, Ack, ErrorReply]
        assert "max_unregistered_prompts_per_peer=2" in replies[2].reason
        wait_idle(launcher)  # nobody registers them: they fail at the bootstrap timeout
        result = generate(launcher, "decode-0", [5, 6, 7])  # this host may submit again
        assert result.finish_reason in ("length", "stop")
