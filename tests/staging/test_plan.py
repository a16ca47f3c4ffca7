import itertools
from collections import Counter

import pytest

from kvferry.staging.plan import HeadSlice, cached_plan, plan_head_transfers, rank_heads

HEADS = (1, 2, 4, 8, 16, 32, 64)
TPS = (1, 2, 4, 8, 16, 32)


def reference_holdings(num_heads: int, tp: int) -> list[list[int]]:
    """Heads per rank, derived independently: equal contiguous blocks, or each head repeated."""
    if tp <= num_heads:
        per = num_heads // tp
        return [list(range(r * per, (r + 1) * per)) for r in range(tp)]
    return [[head] for head in range(num_heads) for _ in range(tp // num_heads)]


def valid(num_heads: int, tp: int) -> bool:
    return num_heads % tp == 0 if tp <= num_heads else tp % num_heads == 0


def check_plan(num_heads: int, src_tp: int, dst_tp: int, plan: list[HeadSlice]) -> None:
    src_hold = reference_holdings(num_heads, src_tp)
    dst_hold = reference_holdings(num_heads, dst_tp)
    received = {dst: [] for dst in range(dst_tp)}
    sends_per_holder = Counter()
    for s in plan:
        assert s.num_heads >= 1
        for k in range(s.num_heads):
            head = src_hold[s.src_rank][s.src_head_start + k]  # source really holds it there
            assert dst_hold[s.dst_rank][s.dst_head_start + k] == head  # lands where dst keeps it
            received[s.dst_rank].append(s.dst_head_start + k)
            sends_per_holder[(head, s.src_rank)] += 1
    for dst, locals_ in received.items():  # every needed head exactly once
        assert sorted(locals_) == list(range(len(dst_hold[dst])))
    for head in range(num_heads):  # load spread over holders: counts differ by at most one
        holders = [r for r in range(src_tp) if head in src_hold[r]]
        counts = [sends_per_holder[(head, r)] for r in holders]
        assert max(counts) - min(counts) <= 1, (head, counts)
    for a, b in itertools.pairwise(plan):  # maximal slices
        mergeable = (a.src_rank, a.dst_rank) == (b.src_rank, b.dst_rank) and (
            a.src_head_start + a.num_heads == b.src_head_start
            and a.dst_head_start + a.num_heads == b.dst_head_start
        )
        assert not mergeable, (a, b)
    assert len(set(plan)) == len(plan)


@pytest.mark.parametrize("num_heads", HEADS)
def test_exhaustive_against_reference(num_heads):
    for src_tp, dst_tp in itertools.product(TPS, TPS):
        if valid(num_heads, src_tp) and valid(num_heads, dst_tp):
            plan = plan_head_transfers(num_heads, src_tp, dst_tp)
            check_plan(num_heads, src_tp, dst_tp, plan)
            if src_tp == dst_tp:
                assert all(s.src_rank == s.dst_rank for s in plan)
        else:
            with pytest.raises(ValueError, match=str(num_heads)):
                plan_head_transfers(num_heads, src_tp, dst_tp)


def test_rank_heads_matches_reference():
    for num_heads, tp in itertools.product(HEADS, TPS):
        if valid(num_heads, tp):
            expected = reference_holdings(num_heads, tp)
            assert [list(rank_heads(num_heads, tp, r)) for r in range(tp)] == expected


def test_tp4_to_tp1_merges_each_source_into_one_slice():
    assert plan_head_transfers(8, 4, 1) == [
        HeadSlice(0, 0, 0, 0, 2),
        HeadSlice(1, 0, 0, 2, 2),
        HeadSlice(2, 0, 0, 4, 2),
        HeadSlice(3, 0, 0, 6, 2),
    ]


def test_tp1_to_tp4_splits_one_source():
    assert plan_head_transfers(8, 1, 4) == [HeadSlice(0, d, 2 * d, 0, 2) for d in range(4)]


def test_replicated_source_sends_each_head_once():
    # 2 heads, prefill TP4 holds each head twice; decode TP1 needs both, once each
    assert plan_head_transfers(2, 4, 1) == [HeadSlice(0, 0, 0, 0, 1), HeadSlice(2, 0, 0, 1, 1)]


def test_replicated_destination_picks_the_right_head():
    # decode TP4 over 2 heads: ranks 0,1 hold head 0; ranks 2,3 hold head 1
    assert plan_head_transfers(2, 1, 4) == [
        HeadSlice(0, 0, 0, 0, 1),
        HeadSlice(0, 1, 0, 0, 1),
        HeadSlice(0, 2, 1, 0, 1),
        HeadSlice(0, 3, 1, 0, 1),
    ]


def test_replicated_both_sides_spreads_over_holders():
    plan = plan_head_transfers(1, 2, 4)
    assert [s.src_rank for s in plan] == [0, 1, 0, 1]


def test_mla_round_robin():
    assert plan_head_transfers(1, 4, 2, mla=True) == [
        HeadSlice(0, 0, 0, 0, 1),
        HeadSlice(1, 1, 0, 0, 1),
    ]
    assert [s.src_rank for s in plan_head_transfers(1, 2, 5, mla=True)] == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="num_kv_heads=8"):
        plan_head_transfers(8, 2, 2, mla=True)


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((8, 3, 1), "tp_size=3"),
        ((8, 1, 6), "tp_size=6"),
        ((4, 6, 1), "tp_size=6"),
        ((0, 1, 1), "num_kv_heads=0"),
        ((8, 0, 1), "tp_size=0"),
    ],
)
def test_invalid_layouts_name_the_numbers(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        plan_head_transfers(*args)


def test_cached_plan_is_the_plan_computed_once():
    first = cached_plan(8, 2, 16)
    assert first == tuple(plan_head_transfers(8, 2, 16))
    assert cached_plan(8, 2, 16) is first  # a repeated registration plans nothing
