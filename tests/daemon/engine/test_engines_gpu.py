"""The engines on a GPU: disaggregated generation equals the model's own greedy generation on
the CPU (which the CPU tests hold equal to transformers), and the decode loop's steady state
never makes the host wait for the device."""

import time

import pytest
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import PrefillScheduler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection
from support.engine_sim import engines, run_until_finished, submit_all
from support.model_helpers import greedy

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200, 31], [1, 2, 3], list(range(40, 70))]


@pytest.fixture(scope="module")
def model():
    config = ModelSection().model_config()  # the embedded random model
    return config, full_weights(config, None, seed=0)


# The first forwards and copies on a fresh machine compile kernels and initialise CUDA while
# holding the GIL, for seconds; both engines share this process, so their transfer threads'
# heartbeats wait too. Liveness timeouts fit for a test, not for a cold start, would fail rooms.
COLD_START = dict(heartbeat_timeout_s=60.0, bootstrap_timeout_s=60.0, transfer_timeout_s=120.0)


def cpu_greedy(model, prompt, steps):
    return greedy(Model(*model), prompt, steps)


def test_decode_loop_never_synchronises_the_host(model):
    server, prefill, decode = engines(None, device="cuda", model=model, **COLD_START)
    steps = 24
    try:
        submit_all(server, prefill, decode, PROMPTS, SamplingParams(max_tokens=steps + 40))
        deadline = time.monotonic() + 60
        while decode.arriving or decode.queued or prefill.busy:  # transfers, warm-up
            assert time.monotonic() < deadline
            prefill.step()
            decode.step()
        for _ in range(3):
            decode.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(steps):  # every step queues a forward
                assert decode.step(), (step, [(o.room, o.finish, o.error) for o in decode.outputs])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        while decode.busy:
            decode.step()
        tokens = {}
        for out in decode.outputs:
            tokens.setdefault(out.room, []).extend(out.tokens)
        for i, prompt in enumerate(PROMPTS):
            assert tokens[1000 + i] == cpu_greedy(model, prompt, steps + 40)
        assert decode.runner.blocks.used_pages == 0
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_prefill_forward_and_its_first_tokens_never_synchronise_the_host(model, temperature):
    """The prefill engine hands a forward's KV to the transfer thread once the forward and its
    first tokens' draw are queued: were the host to wait for the device there, the hand-over
    (and so every gather) would come only once the device had run the whole forward. A batch
    of some prompts' last chunks and other prompts' earlier ones (rows picked for the draw);
    greedy, and drawn with a temperature (on the device too)."""
    runner = ModelRunner(Model(*model, device="cuda"), BlockManager(32, 16))
    scheduler = PrefillScheduler(runner.blocks, 8, 24)

    def prefill(sync_mode: str) -> list[int]:
        params = SamplingParams(max_tokens=1, temperature=temperature, seed=7)
        seqs = [Sequence(list(p), params) for p in PROMPTS]
        for seq in seqs:
            scheduler.add(seq)
        futures, mixed = [], False
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            while batch := scheduler.schedule():
                completing = [work.completes_prompt for work in batch]
                mixed |= any(completing) and not all(completing)
                future = runner.sample_prompt_ends(batch, runner.forward(batch))
                futures += [future] if future is not None else []
                scheduler.computed(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert mixed  # a forward drew the first tokens of some of its rows only
        firsts = {}
        for future in futures:
            firsts.update(zip((w.seq.id for w in future.batch), future.result(), strict=True))
        for seq in seqs:
            runner.blocks.deallocate(seq.id)
        return [firsts[seq.id] for seq in seqs]

    prefill("default")  # kernels compiled, buffers and pinned blocks cached
    firsts = prefill("error")
    if temperature == 0:
        assert firsts == [cpu_greedy(model, prompt, 1)[0] for prompt in PROMPTS]
    else:
        assert all(0 <= token < model[0].vocab_size for token in firsts)


@pytest.mark.parametrize("layer_group", [0, 1])
def test_disaggregated_greedy_on_gpu_equals_cpu(model, layer_group):
    """Layer-wise (an event after every layer, a message per layer) or whole-chunk transfers."""
    server, prefill, decode = engines(
        None, device="cuda", model=model, layer_group=layer_group, **COLD_START
    )
    try:
        submit_all(server, prefill, decode, PROMPTS, SamplingParams(max_tokens=10))
        outputs = run_until_finished(prefill, decode, len(PROMPTS))
        for i, prompt in enumerate(PROMPTS):
            tokens, finish = outputs[1000 + i]
            assert finish in ("length", "stop")
            assert tokens == cpu_greedy(model, prompt, 10)[: len(tokens)]
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()


def test_seeded_sampling_on_the_device_repeats(model):
    """Temperature + top-p drawn on the GPU: the same seeds give the same tokens run after run,
    and the draws are real (not the greedy tokens)."""
    runs = []
    for _ in range(2):
        server, prefill, decode = engines(None, device="cuda", model=model, **COLD_START)
        try:
            params = SamplingParams(max_tokens=12, temperature=1.2, top_p=0.95, seed=11)
            submit_all(server, prefill, decode, PROMPTS, params)
            runs.append(run_until_finished(prefill, decode, len(PROMPTS)))
        finally:
            decode.agent.close()
            prefill.agent.close()
            server.close()
    assert runs[0] == runs[1]
    greedy_tokens = [cpu_greedy(model, prompt, 12) for prompt in PROMPTS]
    assert [runs[0][1000 + i][0] for i in range(len(PROMPTS))] != greedy_tokens
