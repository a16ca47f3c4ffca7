import itertools

import numpy as np
import pytest
import torch

from kvferry.staging.host_copy import library
from kvferry.staging.kv_copy import KVPlanes, gather, scatter
from kvferry.staging.layout import layer_groups
from kvferry.staging.plan import plan_head_transfers, rank_heads
from support.kvsim import TP_PAIRS, bits, random_bits, tp_ranks, transfer

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8]


@pytest.mark.parametrize(
    "heads, src_tp, dst_tp",
    [*TP_PAIRS, (1, 2, 2)],
)
def test_tp_round_trip_is_bit_exact(heads, src_tp, dst_tp):
    gen = torch.Generator().manual_seed(heads * 100 + src_tp * 10 + dst_tp)
    planes, tokens, head_dim = 6, 37, 8
    kv = random_bits((planes, tokens, heads, head_dim), torch.bfloat16, gen)
    src = tp_ranks(heads, src_tp, planes, tokens, head_dim, torch.bfloat16, page_size=16, seed=1)
    dst = tp_ranks(heads, dst_tp, planes, tokens, head_dim, torch.bfloat16, page_size=4, seed=50)
    for r, rank in enumerate(src):
        held = rank_heads(heads, src_tp, r)
        rank.fill(kv[:, :, held.start : held.stop])
    transfer(src, dst, plan_head_transfers(heads, src_tp, dst_tp), tokens)
    for r, rank in enumerate(dst):
        held = rank_heads(heads, dst_tp, r)
        assert torch.equal(bits(rank.read()), bits(kv[:, :, held.start : held.stop]))


def test_mla_round_trip():
    gen = torch.Generator().manual_seed(7)
    planes, tokens, dim = 4, 21, 576
    latent = random_bits((planes, tokens, 1, dim), torch.bfloat16, gen)
    src = tp_ranks(1, 2, planes, tokens, dim, torch.bfloat16, page_size=8, seed=3, mla=True)
    dst = tp_ranks(1, 3, planes, tokens, dim, torch.bfloat16, page_size=1, seed=9, mla=True)
    for rank in src:
        rank.fill(latent)
    transfer(src, dst, plan_head_transfers(1, 2, 3, mla=True), tokens)
    for rank in dst:
        assert torch.equal(bits(rank.read()), bits(latent))


@pytest.mark.parametrize("dtype", DTYPES)
def test_staging_layout_is_plane_token_head_dim(dtype):
    gen = torch.Generator().manual_seed(1)
    cache = random_bits((3, 10, 4, 5), dtype, gen)
    slots = [7, 2, 9]
    out = torch.empty(3 * 3 * 2 * 5, dtype=dtype)
    gather(KVPlanes.from_cache(cache), slots, 1, 2, out)
    assert torch.equal(bits(out.view(3, 3, 2, 5)), bits(cache[:, slots, 1:3]))


@pytest.mark.parametrize("mla", [False, True])
def test_layer_subsets_are_the_layers_planes_in_staging_order(mla):
    per_layer, layers = (1 if mla else 2), 5
    cache = torch.arange(per_layer * layers * 4 * 2 * 3, dtype=torch.float32)
    planes = KVPlanes.from_cache(cache.view(per_layer * layers, 4, 2, 3))
    subset = planes.layers(range(1, 3), layers)
    expected = [kind * layers + layer for kind in range(per_layer) for layer in (1, 2)]
    assert [p.data_ptr() for p in subset.planes] == [planes.planes[i].data_ptr() for i in expected]
    assert planes.layers(range(1, 3), layers) is subset  # built once
    assert planes.layers(range(layers), layers) is planes
    out = torch.empty(subset.staging_bytes(2, 2) // 4)
    gather(subset, [3, 0], 0, 2, out)
    assert torch.equal(
        out.view(len(expected), 2, 2, 3), cache.view(-1, 4, 2, 3)[expected][:, [3, 0]]
    )
    with pytest.raises(ValueError, match="outside a model of 5 layers"):
        planes.layers(range(4, 6), layers)
    with pytest.raises(ValueError, match="do not split into 3 layers"):
        planes.layers(range(1), 3)


def test_layer_groups():
    assert layer_groups(5, 0) == [range(5)]
    assert layer_groups(5, 5) == layer_groups(5, 9) == [range(5)]
    assert layer_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="layer_group=-1"):
        layer_groups(5, -1)


@pytest.mark.parametrize(
    ("layers", "group", "sizes"),
    [
        (16, 4, [4, 4, 4, 2, 1, 1]),
        (16, 8, [8, 4, 2, 1, 1]),
        (16, 3, [3, 3, 3, 3, 3, 1]),  # the last group is one layer already
        (10, 4, [4, 4, 1, 1]),
        (7, 6, [6, 1]),
        (16, 1, [1] * 16),
        (16, 0, [16]),  # whole chunk: nothing to taper
        (16, 16, [16]),
    ],
)
def test_tapered_layer_groups_end_with_one_layer(layers, group, sizes):
    groups = layer_groups(layers, group, taper=True)
    assert [len(g) for g in groups] == sizes
    assert [layer for g in groups for layer in g] == list(range(layers))  # in order, each once


def test_nan_payloads_survive():
    cache = torch.full((2, 4, 1, 2), float("nan"))
    cache.view(torch.int32)[..., 0] = 0x7FC0BEEF  # a NaN with a payload
    out = torch.empty(2 * 4 * 2)
    gather(KVPlanes.from_cache(cache), [3, 2, 1, 0], 0, 1, out)
    assert (out.view(torch.int32).view(2, 4, 2)[..., 0] == 0x7FC0BEEF).all()


def setup_small():
    cache = torch.arange(2 * 8 * 4 * 2, dtype=torch.float32).view(2, 8, 4, 2)
    return KVPlanes.from_cache(cache), cache.clone()


@pytest.mark.parametrize(
    "slots, head_start, num_heads, fragment",
    [
        ([0, 8], 0, 1, "token slot 8"),
        ([-1], 0, 1, "token slot -1"),
        ([0], 3, 2, r"heads \[3, 5\)"),
        ([0], -1, 1, r"heads \[-1, 0\)"),
        ([0], 0, 0, r"heads \[0, 0\)"),
    ],
)
def test_out_of_range_writes_nothing(slots, head_start, num_heads, fragment):
    planes, before = setup_small()
    staging = torch.full((2 * len(slots) * max(num_heads, 1) * 2,), 5.0)
    with pytest.raises(ValueError, match=fragment):
        gather(planes, slots, head_start, num_heads, staging)
    assert (staging == 5.0).all()
    with pytest.raises(ValueError, match=fragment):
        scatter(staging, planes, slots, head_start, num_heads)
    assert torch.equal(torch.stack(planes.planes), before)


def test_wrong_staging_size_and_slot_types():
    planes, _ = setup_small()
    with pytest.raises(ValueError, match=r"holds 28 bytes.*expected a contiguous 64"):
        gather(planes, [0, 1], 0, 2, torch.empty(7))
    with pytest.raises(ValueError, match="1-D integer"):
        gather(planes, np.array([0.5]), 0, 1, torch.empty(4))
    with pytest.raises(ValueError, match="backend='cuda'"):
        gather(planes, [0], 0, 1, torch.empty(4), backend="cuda")


def test_planes_must_agree():
    with pytest.raises(ValueError, match="plane 1"):
        KVPlanes([torch.zeros(4, 2, 2), torch.zeros(4, 2, 3)])


def test_empty_token_list_is_a_no_op():
    planes, before = setup_small()
    gather(planes, [], 0, 4, torch.empty(0))
    scatter(torch.empty(0), planes, [], 0, 4)
    assert torch.equal(torch.stack(planes.planes), before)


def test_every_dtype_round_trips_across_page_sizes():
    gen = torch.Generator().manual_seed(3)
    for dtype, (page_a, page_b) in itertools.product(DTYPES, [(16, 1), (3, 64)]):
        src = tp_ranks(2, 1, 4, 50, 6, dtype, page_a, seed=4)[0]
        dst = tp_ranks(2, 1, 4, 50, 6, dtype, page_b, seed=8)[0]
        kv = random_bits((4, 50, 2, 6), dtype, gen)
        src.fill(kv)
        transfer([src], [dst], plan_head_transfers(2, 1, 1), 50)
        assert torch.equal(bits(dst.read()), bits(kv))


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_copies_match_torch_bit_for_bit(dtype):
    """The native host copies (host_copy.c, the default on a CPU) against torch's indexing:
    gathers of head slices in any slot order, scatters into caches of any other content."""
    if library() is None:
        pytest.fail("the host copies must build here (a C compiler is part of the test setup)")
    gen = torch.Generator().manual_seed(11)
    planes_n, slots_n, heads, head_dim = 6, 40, 5, 6
    cache = random_bits((planes_n, slots_n, heads, head_dim), dtype, gen)
    planes = KVPlanes.from_cache(cache)
    for slots, head_start, num_heads in [([39, 0, 7, 7, 21], 1, 3), (list(range(40)), 0, 5),
                                         ([5], 4, 1)]:  # fmt: skip
        nbytes = planes.staging_bytes(len(slots), num_heads)
        by_host, by_torch = (
            torch.zeros(nbytes, dtype=torch.uint8),
            torch.ones(nbytes, dtype=torch.uint8),
        )
        gather(planes, slots, head_start, num_heads, by_host, backend="host")
        gather(planes, slots, head_start, num_heads, by_torch, backend="torch")
        assert torch.equal(by_host, by_torch)
        distinct = list(dict.fromkeys(slots))  # a slot twice: which write wins is not defined
        src = random_bits((nbytes // dtype.itemsize,), dtype, gen).view(torch.uint8)
        src = src[: planes.staging_bytes(len(distinct), num_heads)]
        targets = [KVPlanes.from_cache(cache.clone()) for _ in range(2)]
        for target, backend in zip(targets, ("host", "torch"), strict=True):
            scatter(src, target, distinct, head_start, num_heads, backend=backend)
        assert torch.equal(
            bits(torch.stack(targets[0].planes)), bits(torch.stack(targets[1].planes))
        )
        assert not torch.equal(bits(torch.stack(targets[0].planes)), bits(cache))


def test_a_backend_that_cannot_run_here_is_refused():
    planes, _ = setup_small()
    with pytest.raises(ValueError, match="not one of"):
        gather(planes, [0], 0, 1, torch.empty(4), backend="fast")
