"""One rank's engine put together: KV cache and runner, scheduler, transfer agent, engine.

The worker, the in-process tests and `bench/overlap.py` all build through `build_engine`; they
differ only in what they pass (the UCX or the loopback data plane, their transfer config, a TP
group or none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from kvferry.daemon.block_manager import BlockManager
from kvferry.daemon.config import CacheSection, SchedulerSection
from kvferry.daemon.decode_engine import DecodeEngine
from kvferry.daemon.group import TPGroup
from kvferry.daemon.model import Model
from kvferry.daemon.prefill_engine import PrefillEngine
from kvferry.daemon.runner import ModelRunner
from kvferry.daemon.scheduler import DecodeScheduler, PrefillScheduler
from kvferry.staging.layout import KVLayout
from kvferry.transport.config import TransferConfig
from kvferry.transport.dataplane import DataPlane
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.sender import PrefillAgent


def build_engine(
    role: Literal["prefill", "decode"],
    model: Model,
    cache: CacheSection,
    scheduler: SchedulerSection,
    transfer: TransferConfig,
    data_plane: Callable[[], DataPlane],
    *,
    model_name: str,
    tp_rank: int = 0,
    group: TPGroup | None = None,
    bootstrap: str | None = None,
    token: bytes | None = None,
    eos_id: int | None = None,
) -> PrefillEngine | DecodeEngine:
    """The engine of rank `tp_rank` of `role` over `model` (already sharded for that rank),
    with a paged KV cache of `cache`'s size. `data_plane` makes the agent's data plane (called
    once, after the cache is allocated); `model_name` is the identity peers compare in the KV
    layout. A prefill agent registers with the bootstrap server at `bootstrap` showing `token`;
    `eos_id` (decode) ends a sequence when sampled."""
    blocks = BlockManager(cache.num_pages, cache.page_size)
    runner = ModelRunner(model, blocks)
    layout = kv_layout(model, model_name, cache.page_size, tp_rank)
    data = data_plane()
    if role == "prefill":
        agent = PrefillAgent(transfer, layout, runner.planes, data, bootstrap, token)
        prefill = PrefillScheduler(blocks, scheduler.chunk_tokens, scheduler.max_batch_tokens)
        return PrefillEngine(runner, prefill, agent, group)
    agent = DecodeAgent(transfer, layout, runner.planes, data)
    decode = DecodeScheduler(blocks, scheduler.max_running)
    return DecodeEngine(runner, decode, agent, eos_id, group)


def kv_layout(model: Model, model_name: str, page_size: int, tp_rank: int = 0) -> KVLayout:
    """The KV layout rank `tp_rank` of `model` shows its peers."""
    dtype = str(model.dtype).removeprefix("torch.")  # "bfloat16", as the config spells it
    return model.config.kv_layout(model_name, dtype, page_size, model.tp_size, tp_rank)
