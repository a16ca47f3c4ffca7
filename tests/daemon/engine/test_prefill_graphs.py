"""What a captured prefill forward is given, checked on the host: the bucket a batch runs in,
its inputs padded so that spare tokens write only the scratch page and spare sequences have
nothing to attend, and which batches must run eagerly (the replay itself: the gpu tests)."""

import itertools

import numpy as np
import pytest
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.inputs import host_inputs, new_slots
from kvferry.daemon.engine.prefill_graphs import (
    MAX_SEQS,
    MAX_TOKENS,
    PrefillGraphs,
    _views,
    layer_bounds,
    token_buckets,
)
from kvferry.daemon.engine.runner import _capture
from kvferry.daemon.engine.scheduler import Work
from kvferry.daemon.engine.sequence import SamplingParams, Sequence

PAGE, PAGES = 4, 64


def graphs(max_tokens: int = 200) -> PrefillGraphs:
    kv = torch.zeros(2, (PAGES + 1) * PAGE, 1, 8)  # the last page: the scratch
    return PrefillGraphs(None, kv, PAGE, PAGES, max_tokens, PAGES, layer_bounds(4, 2))


def test_layer_bounds_split_after_every_group():
    assert layer_bounds(16, 4) == (0, 4, 8, 12, 16)
    assert layer_bounds(10, 4) == (0, 4, 8, 10)
    assert layer_bounds(16, 0) == layer_bounds(16, 16) == layer_bounds(16, 32) == (0, 16)
    assert layer_bounds(16, 4, taper=True) == (0, 4, 8, 12, 14, 15, 16)  # the transfer's groups


def test_token_buckets_pad_little_up_to_the_largest_captured_forward():
    assert graphs(200).buckets == token_buckets(200) == [64, 128, 200]
    assert token_buckets(256) == [64, 128, 256]
    assert token_buckets(24) == [24]
    assert token_buckets(1000) == [64, 128, 256, 512, 768, 1000]
    buckets = token_buckets(8192)
    assert buckets[-1] == MAX_TOKENS  # longer forwards run eagerly
    for smaller, larger in itertools.pairwise(buckets[3:]):
        assert larger <= 1.5 * smaller  # from 512 tokens on, a batch pads by at most half


def test_a_batch_is_padded_into_its_bucket():
    blocks = BlockManager(PAGES, PAGE)
    seqs = [Sequence(list(range(1, n + 1)), SamplingParams()) for n in (30, 7, 50)]
    for seq in seqs:
        blocks.allocate(seq.id, seq.num_prompt)
    batch = [Work(seqs[0], 20, 10), Work(seqs[1], 0, 7), Work(seqs[2], 0, 50)]
    inputs = host_inputs(batch, blocks, {})
    g = graphs()
    assert g.fits(inputs)
    (seqs, size), vector = g.pack(inputs)
    assert (seqs, size) == (4, 128)  # 3 sequences, 67 tokens
    v = _views(vector, seqs, size)
    assert v["tokens"][:67].tolist() == inputs.tokens.tolist() and not v["tokens"][67:].any()
    assert v["positions"][:67].tolist() == inputs.positions.tolist()
    assert v["slots"][:67].tolist() == new_slots(inputs, PAGE).tolist()
    assert set(v["slots"][67:].tolist()) == {PAGES * PAGE}  # the scratch page's first slot
    assert v["lengths"].tolist() == [30, 7, 50, 0]  # the spare sequence attends to nothing
    assert v["starts"].tolist() == [0, 10, 17, 67, 67]
    assert v["last"].tolist() == [9, 16, 66, 0]
    assert g.bucket(1, 64) == (1, 64) and g.bucket(5, 65) == (MAX_SEQS, 128)


def test_batches_past_the_graphs_run_eagerly():
    blocks = BlockManager(10 * PAGES, PAGE)
    g = graphs(max_tokens=64)

    def inputs(*lengths):
        seqs = [Sequence(list(range(1, n + 1)), SamplingParams()) for n in lengths]
        for seq in seqs:
            blocks.allocate(seq.id, seq.num_prompt)
        return host_inputs([Work(s, 0, s.num_prompt) for s in seqs], blocks, {})

    assert g.fits(inputs(64))
    assert not g.fits(inputs(65))  # more tokens than the largest bucket
    assert g.fits(inputs(*[2] * MAX_SEQS))
    assert not g.fits(inputs(*[2] * (MAX_SEQS + 1)))  # more sequences than a graph holds
    pending = inputs(3)
    pending.pending = np.array([[2], [0]], np.int32)  # a token still on the device: decode's
    assert not g.fits(pending)


def test_a_capture_out_of_device_memory_says_what_to_change():
    def capture():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="prefill forward ran out of device memory") as info:
        _capture(capture, "prefill forward")
    assert "engine.cuda_graphs: false" in str(info.value)
    assert "scheduler.max_batch_tokens" in str(info.value)
