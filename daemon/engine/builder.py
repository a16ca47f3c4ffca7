"""One rank's engine put together: KV cache and runner, scheduler, transfer agent, engine.

The worker, the in-process tests and `bench/overlap.py` all build through `build_engine`; they
differ only in what they pass (the UCX or the loopback data plane, their transfer config, a TP
group or none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.decode import DecodeEngine
from kvferry.daemon.engine.group import TPGroup
from kvferry.daemon.engine.prefill import PrefillEngine
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import DecodeScheduler, PrefillScheduler
from kvferry.daemon.model.llama import Model
from kvferry.staging.layout import KVLayout
from kvferry.transport.config import TransferConfig
from kvferry.transport.curve import CurveKeys
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.sender import PrefillAgent


@dataclass(frozen=True)
class EngineSettings:
    """The sizes an engine is built with (the deployment config's `cache` and `scheduler`)."""

    page_size: int  # tokens per KV page
    num_pages: int  # KV pages on this rank
    prefill_chunk_tokens: int = 256  # prefill: tokens per sequence per forward
    max_batch_tokens: int = 1024  # prefill: tokens per forward, all sequences
    max_running: int = 32  # decode: batch size
    # on a GPU, where the forward can be captured: decode, the step per batch size; prefill,
    # the forward per bucket of sequences and tokens (engine/prefill_graphs.py)
    cuda_graphs: bool = True
    # prefill: prompt tokens of rooms not registered yet that may compute meanwhile (0: none)
    unregistered_prefill_tokens: int = 0


def build_engine(
    role: Literal["prefill", "decode"],
    model: Model,
    settings: EngineSettings,
    transfer: TransferConfig,
    data_plane: Callable[[], DataPlane],
    *,
    model_name: str,
    tp_rank: int = 0,
    group: TPGroup | None = None,
    bootstrap: str | None = None,
    token: bytes | None = None,
    keys: CurveKeys | None = None,
    eos_ids: frozenset[int] = frozenset(),
) -> PrefillEngine | DecodeEngine:
    """The engine of rank `tp_rank` of `role` over `model` (already sharded for that rank),
    with a paged KV cache and batches of `settings`' sizes. `data_plane` makes the agent's
    data plane (called once, after the cache is allocated); `model_name` is the identity peers
    compare in the KV layout. A prefill agent registers with the bootstrap server at
    `bootstrap` showing `token`; `keys`: the deployment's CURVE pair, if any; `eos_ids`
    (decode) end a sequence when sampled."""
    blocks = BlockManager(settings.num_pages, settings.page_size)
    graphs = {}
    if settings.cuda_graphs and role == "decode":
        graphs = {"graph_batch": settings.max_running}
    elif settings.cuda_graphs:
        graphs = {
            "graph_tokens": settings.max_batch_tokens,
            "layer_group": transfer.layer_group,
            "layer_taper": transfer.layer_taper,
        }
    runner = ModelRunner(model, blocks, **graphs)
    layout = kv_layout(model, model_name, settings.page_size, tp_rank)
    data = data_plane()
    if role == "prefill":
        agent = PrefillAgent(transfer, layout, runner.planes, data, bootstrap, token, keys)
        prefill = PrefillScheduler(blocks, settings.prefill_chunk_tokens, settings.max_batch_tokens)
        return PrefillEngine(runner, prefill, agent, group, settings.unregistered_prefill_tokens)
    agent = DecodeAgent(transfer, layout, runner.planes, data, keys)
    decode = DecodeScheduler(blocks, settings.max_running)
    return DecodeEngine(runner, decode, agent, eos_ids, group)


def kv_layout(model: Model, model_name: str, page_size: int, tp_rank: int = 0) -> KVLayout:
    """The KV layout rank `tp_rank` of `model` shows its peers."""
    dtype = str(model.dtype).removeprefix("torch.")  # "bfloat16", as the config spells it
    return model.config.kv_layout(model_name, dtype, page_size, model.tp_size, tp_rank)
