import pytest

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.scheduler import DecodeScheduler, PrefillScheduler
from kvferry.daemon.engine.sequence import SamplingParams, SeqStatus, Sequence


def seq(n, max_tokens=4, eos=None):
    return Sequence(
        list(range(1, n + 1)),
        SamplingParams(max_tokens=max_tokens),
        eos_ids=frozenset({eos} - {None}),
    )


def test_chunked_prefill_under_a_token_budget():
    sched = PrefillScheduler(BlockManager(64, 4), prefill_chunk_tokens=8, max_batch_tokens=12)
    a, b = seq(20), seq(5)
    sched.add(a)
    sched.add(b)
    steps = []
    while sched.waiting:
        batch = sched.schedule()
        steps.append([(w.seq is a, w.start, w.count) for w in batch])
        sched.computed(batch)
    assert steps == [[(True, 0, 8), (False, 0, 4)], [(True, 8, 8), (False, 4, 1)], [(True, 16, 4)]]
    assert a.num_computed == 20 and b.num_computed == 5


def test_prefill_waits_for_pages_in_order_and_refuses_oversized_prompts():
    blocks = BlockManager(4, 4)
    sched = PrefillScheduler(blocks, prefill_chunk_tokens=16, max_batch_tokens=64)
    big, small = seq(13), seq(4)  # big takes all 4 pages
    sched.add(big)
    sched.add(small)
    assert [w.seq for w in sched.schedule()] == [big]  # small waits for pages
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        sched.add(seq(17))


def test_decode_batches_one_token_each_and_releases_finished():
    blocks = BlockManager(8, 4)
    sched = DecodeScheduler(blocks, max_running=2)
    a, b, c = seq(3, max_tokens=2), seq(5, max_tokens=3, eos=99), seq(2)
    for s in (a, b, c):
        blocks.allocate(s.id, s.num_prompt)
        s.append(7)  # the first token, sampled by prefill
        sched.admit(s)
    batch = sched.schedule()
    assert [(w.seq, w.start) for w in batch] == [(a, 3), (b, 5)] and c.status is SeqStatus.WAITING
    finished = sched.sampled(batch, [8, 99])
    assert finished == [a, b] and a.finish_reason == "length" and b.finish_reason == "stop"
    assert [w.seq for w in sched.schedule()] == [c]
    blocks.check()


def test_sampling_params_are_checked():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
