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


def run_until_finished(prefill, decode, count, timeout_s=60):
    """Step both engines until `count` rooms finished on decode and prefill let go of every
    room; {room: (tokens, finish reason)}."""
    tokens, finish = {}, {}
    deadline = time.monotonic() + timeout_s
    while len(finish) < count or prefill.busy:
        assert time.monotonic() < deadline, f"{len(finish)} of {count} finished"
        if not (prefill.step() | decode.step()):
            time.sleep(0.001)
        for out in decode.outputs:
            tokens.setdefault(out.room, []).extend(out.tokens)
            if out.finish:
                finish[out.room] = out.error or out.finish
        decode.outputs.clear()
    return {room: (tokens.get(room, []), reason) for room, reason in finish.items()}


def test_disaggregated_greedy_equals_transformers(qwen3):
    hf, path = qwen3
    server, prefill, decode = engines(path)
    prompts = [
        [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200, 31, 8, 9, 10, 11, 12, 13],
        [1, 2, 3],
        list(range(40, 70)),
    ]
    try:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=10)
            decode.submit(1000 + i, prompt, params, bootstrap=server.address)
            prefill.submit(1000 + i, prompt, params)
        outputs = run_until_finished(prefill, decode, len(prompts))
        for i, prompt in enumerate(prompts):
            tokens, finish = outputs[1000 + i]
            assert finish == "length"
            assert tokens == hf_greedy(hf, prompt, 10)
        assert prefill.runner.blocks.used_pages == 0 and decode.runner.blocks.used_pages == 0
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()
