"""Prefill and decode engines in one process over the loopback data plane, for the tests."""

from __future__ import annotations

import time

from kvferry.daemon.block_manager import BlockManager
from kvferry.daemon.decode_engine import DecodeEngine
from kvferry.daemon.model import Model
from kvferry.daemon.model_config import ModelConfig
from kvferry.daemon.prefill_engine import PrefillEngine
from kvferry.daemon.runner import ModelRunner
from kvferry.daemon.scheduler import DecodeScheduler, PrefillScheduler
from kvferry.daemon.weights import full_weights
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.dataplane import LoopbackDataPlane
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.sender import PrefillAgent
from transfer_sim import small_config


def engines(
    path, prefill_page=16, decode_page=4, device="cpu", model=None, layer_group=0, **transfer
):
    """Bootstrap server, prefill and decode engines over the loopback data plane, serving the
    checkpoint at `path` (or `model`: (config, weights)); KV moves in messages of
    `layer_group` layers (0: whole chunks); `transfer`: other TransferConfig changes."""
    config, weights = model or (ModelConfig.from_dir(path), None)
    weights = weights if weights is not None else full_weights(config, path)
    transfer = small_config(chunk_tokens=8, layer_group=layer_group, **transfer)
    server = BootstrapServer(1)
    p_blocks, d_blocks = BlockManager(32, prefill_page), BlockManager(64, decode_page)
    p_runner = ModelRunner(Model(config, weights, device=device), p_blocks)
    d_runner = ModelRunner(Model(config, weights, device=device), d_blocks)
    p_agent = PrefillAgent(
        transfer,
        config.kv_layout("tiny", "float32", prefill_page, 1, 0),
        p_runner.planes,
        LoopbackDataPlane(),
        server.address,
        server.token,
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


def submit_all(server, prefill, decode, prompts, params) -> list[int]:
    """Each prompt to both engines, rooms 1000, 1001, ...; returns the rooms."""
    rooms = [1000 + i for i in range(len(prompts))]
    for room, prompt in zip(rooms, prompts, strict=True):
        decode.submit(room, prompt, params, bootstrap=server.address)
        prefill.submit(room, prompt, params)
    return rooms
