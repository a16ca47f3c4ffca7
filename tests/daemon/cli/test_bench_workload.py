"""`kvferry bench`'s workload: prompt lengths, random and ShareGPT prompts, arrival times."""

import itertools
import json
import random

import pytest

from kvferry.daemon.cli.bench.workload import (
    BenchError,
    Prompt,
    dataset_prompts,
    load_sharegpt,
    poisson_schedule,
    random_prompts,
    sample_length,
)


@pytest.mark.parametrize(("length", "ratio", "low"), [(100, 0.5, 50), (100, 1.0, 100), (3, 0, 1)])
def test_lengths_are_uniform_within_the_range_ratio(length, ratio, low):
    rng = random.Random(0)
    drawn = [sample_length(rng, length, ratio) for _ in range(2000)]
    assert min(drawn) == low
    assert max(drawn) == length


def test_random_prompts_stay_in_the_vocab_and_repeat_with_the_seed():
    prompts = random_prompts(random.Random(7), 20, 32, 8, 0.5, vocab=5)
    assert all(0 <= i < 5 for p in prompts for i in p.prompt)
    assert all(len(p.prompt) == p.input_len and 16 <= p.input_len <= 32 for p in prompts)
    assert all(4 <= p.output_len <= 8 for p in prompts)
    assert random_prompts(random.Random(7), 20, 32, 8, 0.5, vocab=5) == prompts


def test_sharegpt_keeps_entries_with_both_turns(tmp_path):
    path = tmp_path / "data.json"
    entries = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "héllo"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "why"},
                           {"from": "gpt", "value": "x" * 500}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": [{"from": "gpt", "value": "an answer"}, {"from": "human", "value": "q"}]},
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "empty"}]},
        {"conversations": "not a list"},
        {"id": "no conversations"},
        "not an object",
        {"conversations": [None, {"from": "human", "value": "ok"}, {"from": "gpt", "value": 3}]},
    ]  # fmt: skip
    path.write_text(json.dumps(entries))
    prompts = load_sharegpt(path, output_len=64)
    assert prompts == [
        Prompt(prompt="hi", input_len=2, output_len=6),  # "héllo" is 6 UTF-8 bytes
        Prompt(prompt="why", input_len=3, output_len=64),  # capped by output_len
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("{not json", "cannot read"), ('{"a": 1}', "expected a JSON list"), ("[{}]", "no entry")],
)
def test_sharegpt_files_that_cannot_be_used(tmp_path, text, complaint):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(BenchError, match=complaint):
        load_sharegpt(path, 64)


def test_dataset_draws_without_replacement_while_it_can():
    entries = [Prompt(prompt=str(i), input_len=1, output_len=1) for i in range(10)]
    assert len({p.prompt for p in dataset_prompts(random.Random(0), entries, 10)}) == 10
    assert len(dataset_prompts(random.Random(0), entries, 25)) == 25


def test_poisson_schedule_is_deterministic_with_a_seed():
    times = poisson_schedule(rate=4.0, count=2000, seed=3)
    assert times == poisson_schedule(rate=4.0, count=2000, seed=3)
    assert times != poisson_schedule(rate=4.0, count=2000, seed=4)
    assert times[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(times))
    assert times[-1] / (len(times) - 1) == pytest.approx(1 / 4.0, rel=0.1)
