"""Prefill and decode engines in one process over the loopback data plane: disaggregated
generation equals transformers' greedy generation."""

import pytest

from kvferry.daemon.engine.sequence import SamplingParams
from support.engine_sim import engines, run_until_finished, submit_all
from support.model_helpers import checkpoint, hf_greedy


@pytest.fixture
def qwen3(tmp_path):
    pytest.importorskip("transformers")
    return checkpoint(tmp_path, "qwen3")


@pytest.mark.parametrize("layer_group", [0, 1])
def test_disaggregated_greedy_equals_transformers(qwen3, layer_group):
    hf, path = qwen3
    server, prefill, decode = engines(path, layer_group=layer_group)
    prompts = [
        [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200, 31, 8, 9, 10, 11, 12, 13],
        [1, 2, 3],
        list(range(40, 70)),
    ]
    try:
        submit_all(server, prefill, decode, prompts, SamplingParams(max_tokens=10))
        outputs = run_until_finished(prefill, decode, len(prompts))
        for i, prompt in enumerate(prompts):
            tokens, finish = outputs[1000 + i]
            assert finish == "length"
            assert tokens == hf_greedy(hf, prompt, 10)
        assert prefill.runner.blocks.used_pages == 0 and decode.runner.blocks.used_pages == 0
        layers = prefill.runner.model.config.num_hidden_layers
        groups = layers if layer_group else 1
        chunks = sum(-(-len(p) // 8) for p in prompts)
        assert prefill.agent.core.data.messages_sent == chunks * groups
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()
