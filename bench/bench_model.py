"""The benches' random model: its sizes as arguments, and the model built from them."""

from __future__ import annotations

import argparse

import torch

from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection


def add_model_args(p: argparse.ArgumentParser, gpu: bool) -> None:
    """The random model's sizes and where it runs (`build_model`): a 16-layer model on a GPU,
    a small one on a CPU."""
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--layers", type=int, default=16 if gpu else 4)
    p.add_argument("--hidden", type=int, default=2048 if gpu else 256)
    p.add_argument("--heads", type=int, default=16 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    p.add_argument("--intermediate", type=int, default=5632 if gpu else 512)


def build_model(args) -> Model:
    """The daemons' random model, at the sizes in `args`."""
    config = ModelSection(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    ).model_config()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    return Model(config, full_weights(config, None), device=device, dtype=dtype)
