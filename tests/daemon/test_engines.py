"""Prefill and decode engines in one process over the loopback data plane: disaggregated
generation equals transformers' greedy generation."""

import time

import pytest

from kvferry.daemon.block_manager import BlockManager
from kvferry.daemon.decode_engine import DecodeEngine
from kvferry.daemon.model import Model
from kvferry.daemon.model_config import ModelConfig
from kvferry.daemon.prefill_engine import PrefillEngine
from kvferry.daemon.runner import ModelRunner
from kvferry.daemon.scheduler import DecodeScheduler, PrefillScheduler
from kvferry.daemon.sequence import SamplingParams
from kvferry.daemon.weights import full_weights
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.dataplane import LoopbackDataPlane
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.sender import PrefillAgent
from test_model_helpers import checkpoint, hf_greedy
from transfer_sim import small_config

transformers = pytest.importorskip("transformers")


@pytest.fixture
def qwen3(tmp_path):
    return checkpoint(tmp_path, "qwen3")


def engines(path, prefill_page=16, decode_page=4):
    config = ModelConfig.from_dir(path)
    weights = full_weights(config, path)
    transfer = small_config(chunk_tokens=8)
    server = BootstrapServer(1)
    p_blocks, d_blocks = BlockManager(32, prefill_page), BlockManager(64, decode_page)
    p_runner = ModelRunner(Model(config, weights), p_blocks)
    d_runner = ModelRunner(Model(config, weights), d_blocks)
    p_agent = PrefillAgent(
        transfer,
        config.kv_layout("tiny", "float32", prefill_page, 1, 0),
        p_runner.planes,
        LoopbackDataPlane(),
        server.address,
    )
    d_agent = DecodeAgent(
        transfer,
        config.kv_layout("tiny", "float32", decode_page, 1, 0),
        d_runner.planes,
        LoopbackDataPlane(),
    )
    prefill = PrefillEngine(
        p_runner, PrefillScheduler(p_blocks, chunk_tokens=8, max_batch_tokens=24), p_agent
    )
    decode = DecodeEngine(d_runner, DecodeScheduler(d_blocks, max_running=8), d_agent)
    return server, prefill, decode


def test_disaggregated_greedy_equals_transformers(qwen3):
    hf, path = qwen3
    server, prefill, decode = engines(path)
    prompts = [
        [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200, 31, 8, 9, 10, 11, 12, 13],
        [1, 2, 3],
        list(range(40, 70)),
    ]
    try:
        seqs = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=10)
            seqs.append(decode.submit(prompt, params, room=1000 + i, bootstrap=server.address))
            prefill.submit(prompt, params, room=1000 + i)
        deadline = time.monotonic() + 60
        while len(decode.finished) < len(prompts) and time.monotonic() < deadline:
            busy = prefill.step() | decode.step()
            if not busy:
                time.sleep(0.001)
        for prompt, seq in zip(prompts, seqs, strict=True):
            assert seq.finish_reason == "length", seq.finish_reason
            assert seq.output == hf_greedy(hf, prompt, 10)
        while prefill.handing_over and time.monotonic() < deadline:
            prefill.step()
        assert prefill.runner.blocks.used_pages == 0 and decode.runner.blocks.used_pages == 0
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()
