"""The engines on a GPU: disaggregated generation equals the model's own greedy generation on
the CPU (which the CPU tests hold equal to transformers), and the decode loop's steady state
never makes the host wait for the device."""

import time

import pytest
import torch

from kvferry.daemon.engine.sequence import SamplingParams
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
