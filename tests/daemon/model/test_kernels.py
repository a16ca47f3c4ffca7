"""The Triton kernels against the eager reference (`TorchOps`): on a GPU when there is one, else
in Triton's interpreter on the CPU — the same kernel source either way."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are defined: before importing them
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kvferry.daemon.model.batch import Batch
from kvferry.daemon.model.ops import Heads, KernelOps, TorchOps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = Heads(q=8, kv=2, dim=16)


def ops(dtype=torch.float32):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEADS.dim, 2).float() / HEADS.dim))
    inv_freq = inv_freq.to(DEVICE)
    return TorchOps(HEADS, inv_freq, dtype), KernelOps(HEADS, inv_freq, sms=4)


def paged_batch(lengths, new, page_size, pages=256, seed=0):
    """Sequences of `lengths` tokens whose last `new[s]` are new, in shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(pages, generator=gen)
    width = max(-(-n // page_size) for n in lengths)
    table, used = torch.zeros(len(lengths), width, dtype=torch.int32), 0
    for s, n in enumerate(lengths):
        count = -(-n // page_size)
        table[s, :count] = order[used : used + count]
        used += count
    positions = torch.cat([torch.arange(n - k, n) for n, k in zip(lengths, new, strict=True)])
    rows = torch.cat([torch.full((k,), s) for s, k in enumerate(new)])
    slots = table[rows, positions // page_size].long() * page_size + positions % page_size
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return Batch(
        tokens=torch.zeros(len(positions), dtype=torch.long).to(DEVICE),
        positions=positions.to(DEVICE),
        slots=slots.to(DEVICE),
        last=(starts[1:] - 1).long().to(DEVICE),
        table=table.to(DEVICE),
        lengths=torch.tensor(lengths, dtype=torch.int32).to(DEVICE),
        starts=starts.to(DEVICE),
        page_size=page_size,
        max_new=max(new),
    )


def caches(pages, page_size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (pages * page_size, HEADS.kv, HEADS.dim)
    return (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))


@pytest.mark.parametrize(
    "lengths,new,page_size",
    [
        ([37], [1], 16),  # one sequence: the decode path splits its context
        ([5, 130, 64, 1], [1, 1, 1, 1], 16),  # a decode batch of mixed lengths
        ([40, 9], [40, 9], 4),  # whole prompts
        ([100, 70], [30, 70], 8),  # a later chunk over earlier pages, and a whole prompt
        ([3, 200], [1, 80], 1),  # one-slot pages
    ],
)
def test_paged_attention_matches_the_reference(lengths, new, page_size):
    reference, kernels = ops()
    batch = paged_batch(lengths, new, page_size)
    k_cache, v_cache = caches(256, page_size)
    q = torch.randn(len(batch.positions), HEADS.q, HEADS.dim).to(DEVICE)
    expected = reference.attend(q, k_cache, v_cache, reference.begin(batch))
    got = kernels.attend(q, k_cache, v_cache, kernels.begin(batch))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_cache_write_match_the_reference(qk_norm):
    reference, kernels = ops()
    batch = paged_batch([20, 7], [6, 7], 4)
    width = (HEADS.q + 2 * HEADS.kv) * HEADS.dim
    qkv = torch.randn(len(batch.positions), width).to(DEVICE)
    norm = None
    if qk_norm:
        norm = (torch.rand(HEADS.dim).to(DEVICE), torch.rand(HEADS.dim).to(DEVICE), 1e-6)
    results = []
    for op in (reference, kernels):
        k_cache, v_cache = (torch.zeros(256 * 4, HEADS.kv, HEADS.dim).to(DEVICE) for _ in "kv")
        q = op.rope_store(qkv, op.begin(batch), k_cache, v_cache, norm)
        results.append((q, k_cache, v_cache))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fused_norm_and_activation_match_the_reference():
    reference, kernels = ops()
    h, delta = torch.randn(5, 96).to(DEVICE), torch.randn(5, 96).to(DEVICE)
    weight = torch.rand(96).to(DEVICE)
    for with_delta in (None, delta):
        for got, expected in zip(
            kernels.add_norm(h, with_delta, weight, 1e-5),
            reference.add_norm(h, with_delta, weight, 1e-5),
            strict=True,
        ):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(3, 2 * 1500).to(DEVICE)
    torch.testing.assert_close(kernels.silu_mul(gate_up), reference.silu_mul(gate_up))
