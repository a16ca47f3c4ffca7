"""Prefill and decode engines in one process over the loopback data plane, for the tests."""

from __future__ import annotations

import time

from kvferry.daemon.engine.builder import EngineSettings, build_engine
from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import full_weights
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.loopback import LoopbackDataPlane
from support.transfer_sim import small_config


def engines(
    path,
    prefill_page=16,
    decode_page=4,
    device="cpu",
    model=None,
    layer_group=0,
    unregistered_tokens=0,
    **transfer,
):
    """Bootstrap server, prefill and decode engines over the loopback data plane, serving the
    checkpoint at `path` (or `model`: (config, weights)); KV moves in messages of
    `layer_group` layers (0: whole chunks); prefill computes up to `unregistered_tokens` of
    prompts before their rooms are registered; `transfer`: other TransferConfig changes."""
    config, weights = model or (ModelConfig.from_dir(path), None)
    weights = weights if weights is not None else full_weights(config, path)
    transfer = small_config(chunk_tokens=8, layer_group=layer_group, **transfer)
    server = BootstrapServer(1)
    prefill = build_engine(
        "prefill",
        Model(config, weights, device=device),
        EngineSettings(
            page_size=prefill_page,
            num_pages=32,
            prefill_chunk_tokens=8,
            max_batch_tokens=24,
            unregistered_prefill_tokens=unregistered_tokens,
        ),
        transfer,
        LoopbackDataPlane,
        model_name="tiny",
        bootstrap=server.address,
        token=server.token,
    )
    decode = build_engine(
        "decode",
        Model(config, weights, device=device),
        EngineSettings(page_size=decode_page, num_pages=64, max_running=8),
        transfer,
        LoopbackDataPlane,
        model_name="tiny",
    )
    return server, prefill, decode


def run_until_finished(prefill, decode, count, timeout_s=60):
    """Step both engines until `count` rooms finished on decode and prefill let go of every
    room; {room: (tokens, its Failure or finish reason)}."""
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
