"""How a daemon's configuration fits its model, once the model config is known: the checks that
need it (TP against the KV heads, the staging ring against one chunk), and the ring a prefill
daemon gets when its file leaves `transfer.staging_bytes` unset."""

from __future__ import annotations

import msgspec

from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.server.config import ConfigError, DaemonConfig
from kvferry.staging.plan import check_tp
from kvferry.transport.config import TransferConfig, prefill_ring_bytes


def check_against(daemon: DaemonConfig, model: ModelConfig) -> None:
    """Checks that need the model config: TP against its heads, ring against one chunk."""
    where = daemon.name or daemon.role
    try:
        check_tp(model.num_key_value_heads, daemon.tp)
    except ValueError as exc:
        raise ConfigError(f"{where}: tp: {exc}") from None
    if model.num_attention_heads % daemon.tp:
        raise ConfigError(
            f"{where}: tp={daemon.tp} does not divide "
            f"num_attention_heads={model.num_attention_heads}"
        )
    per_token = _bytes_per_token(daemon, model)
    chunk = per_token * daemon.transfer.chunk_tokens
    ring = transfer_for(daemon, model).ring_bytes
    if daemon.transfer.mode == "staged" and chunk > ring:
        unset = " (unset: the default)" if daemon.transfer.staging_bytes is None else ""
        raise ConfigError(
            f"{where}: transfer.staging_bytes={ring}{unset} is smaller than one chunk's KV "
            f"({daemon.transfer.chunk_tokens} tokens x {per_token} B = {chunk} B)"
        )


def transfer_for(daemon: DaemonConfig, model: ModelConfig) -> TransferConfig:
    """The daemon's transfer section with the ring sized where the file leaves it unset: on
    prefill, one forward's KV (`scheduler.max_batch_tokens` tokens, at most the KV pool's) or
    one transfer chunk's, whichever is more; on decode, the transport's default."""
    transfer = daemon.transfer
    if transfer.staging_bytes is not None or daemon.role != "prefill":
        return transfer
    pool = daemon.cache.num_pages * daemon.cache.page_size
    tokens = max(min(daemon.scheduler.max_batch_tokens, pool), transfer.chunk_tokens)
    ring = prefill_ring_bytes(tokens, _bytes_per_token(daemon, model))
    return msgspec.structs.replace(transfer, staging_bytes=ring)


def _bytes_per_token(daemon: DaemonConfig, model: ModelConfig) -> int:
    """One token's KV on one rank (every rank holds as many heads), all layers."""
    layout = model.kv_layout(
        daemon.model.name, daemon.model.dtype, daemon.cache.page_size, daemon.tp, 0
    )
    return layout.bytes_per_token
