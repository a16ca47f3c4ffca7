"""A tensor-parallel rank of the decoder in its own process (gloo), for the TP tests."""

from __future__ import annotations

import torch.distributed as dist


def greedy_rank(
    rank: int, world: int, port: int, path: str, prompt: list[int], steps: int, out
) -> None:
    from kvferry.daemon.model.config import ModelConfig
    from kvferry.daemon.model.llama import Model
    from kvferry.daemon.model.weights import full_weights
    from support.model_helpers import greedy

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        config = ModelConfig.from_dir(path)
        model = Model(config, full_weights(config, path), tp_size=world, tp_rank=rank)
        out.put((rank, greedy(model, prompt, steps)))
    finally:
        dist.destroy_process_group()
