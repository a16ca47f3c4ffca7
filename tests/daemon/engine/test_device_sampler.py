"""Draws made on the device (`Sampler.sample_on_device`, `draw_batch`), run here on CPU tensors:
greedy rows untouched, the same seed the same tokens, the nucleus and temperature respected,
non-finite logits flagged for their row only."""

import math

import numpy as np
import torch

from kvferry.daemon.engine.inputs import Uploader
from kvferry.daemon.engine.sampler import Sampler, draw_batch
from kvferry.daemon.engine.sequence import SamplingParams, Sequence

VOCAB = 50
UPLOAD = Uploader(torch.device("cpu")).upload


def seq(temperature=1.0, top_p=1.0, seed=7) -> Sequence:
    return Sequence([1, 2], SamplingParams(100, temperature, top_p, seed))


def logits(rows=4, seed=0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_greedy_rows_are_the_argmax_and_draw_nothing():
    x = logits()
    tokens, failed = Sampler().sample_on_device(x, [seq(0.0) for _ in range(4)], UPLOAD)
    assert failed is None
    assert tokens.tolist() == x.argmax(-1).tolist()


def test_the_same_seed_draws_the_same_tokens_step_after_step():
    x = logits(1).repeat(3, 1)
    runs = []
    for _ in range(2):
        sampler, seqs = Sampler(), [seq(1.5, seed=s) for s in (1, 2, 1)]
        runs.append([sampler.sample_on_device(x, seqs, UPLOAD)[0].tolist() for _ in range(20)])
    assert runs[0] == runs[1]
    first, second = zip(*[(step[0], step[1]) for step in runs[0]], strict=True)
    assert first == tuple(step[2] for step in runs[0])  # rows 0 and 2 share a seed
    assert len(set(first)) > 1 and first != second  # a real draw, seeded per sequence


def test_draws_follow_the_distribution_and_stay_in_the_nucleus():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(4000, 1)
    noise = torch.empty(4000, 5, dtype=torch.float64).exponential_(
        generator=torch.Generator().manual_seed(0)
    )
    ones = torch.ones(4000)
    tokens, finite = draw_batch(x, ones, ones, noise)
    assert finite.all()
    counts = np.bincount(tokens.numpy(), minlength=5) / 4000
    np.testing.assert_allclose(counts, torch.softmax(x[0], 0).numpy(), atol=0.03)
    tokens, _ = draw_batch(x, ones, ones * 0.7, noise)  # nucleus: tokens 0 and 1 (0.66 + 0.24)
    assert set(tokens.tolist()) == {0, 1}
    tokens, _ = draw_batch(x, ones * 1e-40, ones, noise)  # far below float32's range: greedy
    assert set(tokens.tolist()) == {0}


def test_non_finite_logits_fail_their_row_only():
    x = logits()
    x[1, 3], x[2, 0] = math.nan, math.inf
    seqs = [seq(0.8, 0.9, seed=s) for s in range(4)]
    tokens, failed = Sampler().sample_on_device(x, seqs, UPLOAD)
    assert failed.tolist() == [False, True, True, False]
    assert all(0 <= t < VOCAB for t in tokens.tolist())
