"""Sampling is numerically safe for every accepted temperature and top_p, and a draw that fails
fails only its own sequence."""

import math

import pytest
import torch

from kvferry.daemon.engine.sampler import Sampler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence

VOCAB = 64


def _logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 10  # [rows, vocab], a clear maximum


def _seq(temperature: float, top_p: float = 1.0, seed: int = 1) -> Sequence:
    return Sequence([1, 2, 3], SamplingParams(4, temperature, top_p, seed))


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-30, 1e-5, 5e-324])
def test_tiny_temperatures_pick_the_maximum(temperature):
    logits = _logits(4)
    sampled = Sampler().sample(logits, [_seq(temperature, seed=s) for s in range(4)])
    assert sampled.errors == {}
    assert sampled.tokens == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-40, 1e-5])
def test_tiny_temperature_splits_a_tie(temperature):
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = logits[0, 9] = 5.0
    drawn = {Sampler().sample(logits, [_seq(temperature, seed=s)]).tokens[0] for s in range(40)}
    assert drawn == {3, 9}


@pytest.mark.parametrize("temperature", [1.0, 1e30, 1e300])
def test_large_temperatures_draw_valid_tokens(temperature):
    logits = _logits() / 10  # spread of ~1: T = 1 leaves several tokens likely
    sampler, seqs = Sampler(), [_seq(temperature, seed=s) for s in range(64)]
    tokens = [sampler.sample(logits, [seq]).tokens[0] for seq in seqs]
    assert all(0 <= t < VOCAB for t in tokens)
    assert len(set(tokens)) > 1  # flat enough that 64 seeds do not all agree


@pytest.mark.parametrize("top_p", [1e-300, 1e-9, 0.5, 1 - 1e-16, 1.0])
@pytest.mark.parametrize("temperature", [1e-40, 1.0, 1e30])
def test_top_p_edges(top_p, temperature):
    logits = _logits()
    sampled = Sampler().sample(logits, [_seq(temperature, top_p)])
    assert sampled.errors == {}
    assert 0 <= sampled.tokens[0] < VOCAB
    if top_p <= 1e-9 and temperature <= 1:  # the nucleus is the top token alone (at 1e30
        # every token ties to float64 precision, so the "top" one is any of them)
        assert sampled.tokens[0] == int(logits.argmax())


def test_seeded_draws_repeat():
    logits = _logits()
    first = [Sampler().sample(logits, [_seq(0.7, 0.9, seed=42)]).tokens[0] for _ in range(3)]
    assert len(set(first)) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_failed_draw_fails_only_its_sequence(bad):
    logits = _logits(3)
    logits[1, 5] = bad
    seqs = [_seq(1.0), _seq(1.0), _seq(0.0)]
    sampled = Sampler().sample(logits, seqs)
    assert set(sampled.errors) == {seqs[1].id}
    assert "not finite" in sampled.errors[seqs[1].id]
    assert len(sampled.tokens) == 3 and sampled.tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"temperature": math.nan}, "temperature=nan"),
        ({"temperature": math.inf}, "temperature=inf"),
        ({"temperature": -1e-40}, "temperature="),
        ({"top_p": math.nan}, "top_p=nan"),
        ({"top_p": math.inf}, "top_p=inf"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"seed": 1 << 64}, "seed=18446744073709551616"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_sampling_params_refuse_values_that_cannot_be_served(fields, name):
    with pytest.raises(ValueError, match=name.replace("+", r"\+")):
        SamplingParams(**fields)


def test_sampling_params_accept_the_edges():
    SamplingParams(temperature=5e-324, top_p=5e-324, seed=(1 << 64) - 1)
    SamplingParams(temperature=1e308, seed=0)
