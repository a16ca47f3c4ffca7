"""Where a daemon's rank runs and how it joins its tensor-parallel group: its device, the
process group (NCCL when every rank has a GPU of its own, gloo otherwise), the pipes to the
other ranks (daemon/engine/links.py) that carry the group's per-step exchanges, and the
all-reduce its model uses."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from kvferry.daemon.engine.group import TPGroup
from kvferry.daemon.engine.links import Links
from kvferry.daemon.model.shared_reduce import (
    SharedDeviceAllReduce,
    SharedHostAllReduce,
    SharedMemoryUnavailable,
)
from kvferry.daemon.server.config import DaemonConfig

log = logging.getLogger(__name__)


def rank_device(config: DaemonConfig, rank: int) -> torch.device:
    """The device of rank `rank` (a GPU is made current)."""
    if config.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but this host has no CUDA device")
    count = torch.cuda.device_count()
    index = config.gpus[rank % len(config.gpus)] if config.gpus else rank % count
    if index >= count:
        raise RuntimeError(f"gpus={config.gpus}: GPU {index} is not here ({count} visible)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def join_group(
    config: DaemonConfig, rank: int, address: str, device: torch.device, links: dict | None
) -> TPGroup:
    """NCCL for the model when every rank has its own GPU, gloo otherwise; control messages
    (commands, verdicts, barriers) over the ranks' pipes (`links`), else a gloo group of host
    tensors."""
    if config.tp == 1:
        return TPGroup()
    gpus = set(config.gpus) if config.gpus else range(torch.cuda.device_count())
    own_gpus = device.type == "cuda" and len(gpus) >= config.tp  # one GPU per rank
    backend = "nccl" if own_gpus else "gloo"
    timeout = timedelta(seconds=config.transfer.transfer_timeout_s)
    dist.init_process_group(
        backend,
        init_method=address,
        rank=rank,
        world_size=config.tp,
        timeout=timeout,
        device_id=device if own_gpus else None,
    )
    if links:  # the pipes carry every control message: no process group of host tensors
        return TPGroup(config.tp, rank, None, Links(rank, links, timeout.total_seconds()))
    control = dist.new_group(backend="gloo", timeout=timeout) if own_gpus else dist.group.WORLD
    return TPGroup(config.tp, rank, control)


def model_all_reduce(config: DaemonConfig, group: TPGroup, device, hidden: int, dtype):
    """The all-reduce of TP ranks that all run on one GPU, or on CPUs over the ranks' pipes
    (None otherwise: the group's own, NCCL); its barrier is the group's."""
    if config.tp == 1:
        return None
    tokens = max(config.scheduler.max_batch_tokens, config.scheduler.max_running)
    if device.type == "cpu":
        if group.links is None:
            return None
        try:
            return SharedHostAllReduce(group, tokens * hidden, dtype)
        except SharedMemoryUnavailable as exc:
            log.warning("TP all-reduce over gloo: no shared memory for it (%s)", exc)
            return None
    gpus = set(config.gpus) if config.gpus else set(range(torch.cuda.device_count()))
    if len(gpus) != 1:
        return None
    # ordered on the device where the ranks' kernels run side by side (MPS), so that the
    # forwards can be CUDA graphs; a barrier waits as long as a transfer may
    return SharedDeviceAllReduce(
        dist.group.WORLD, group.rank, config.tp, device, tokens * hidden, dtype, group.barrier,
        timeout_s=config.transfer.transfer_timeout_s,
    )  # fmt: skip
