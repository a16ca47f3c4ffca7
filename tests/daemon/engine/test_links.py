"""The pipes between a daemon's ranks: barrier, broadcast and OR-reduction agree on every rank;
a gone, silent or out-of-step peer fails with an error naming it; the host all-reduce over
them. Each rank is a thread here
(the daemon's ranks are processes: the daemon tests run them)."""

import multiprocessing as mp
import threading

import pytest
import torch

from kvferry.daemon.engine.group import TPGroup, Verdict
from kvferry.daemon.engine.links import GroupError, Links, close_links, make_links
from kvferry.daemon.model.shared_reduce import SharedHostAllReduce, SharedMemoryUnavailable
from kvferry.transport.room import KVPoll


def run_ranks(size, body, timeout_s=10.0):
    """`body(rank, links)` on `size` threads, one per rank; [each one's result or exception]."""
    ends = make_links(mp.get_context("spawn"), size)
    results = [None] * size

    def run(rank):
        try:
            results[rank] = body(rank, Links(rank, ends[rank], timeout_s))
        except Exception as exc:  # returned to the test, which asserts on it
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    close_links(ends)
    return results


def test_every_rank_gets_the_roots_object_and_the_or_of_every_ranks_values():
    def body(rank, links):
        links.barrier()
        got = links.broadcast({"commands": [rank]} if rank == 0 else None)
        masks = links.all_or((1 << rank, 0, 8 if rank == 2 else 0))
        links.barrier()
        return got, masks

    assert run_ranks(3, body) == [({"commands": [0]}, (0b111, 0, 8))] * 3


def test_verdicts_over_the_links_take_any_ranks_flag():
    states = [
        [KVPoll.Success, KVPoll.Transferring, KVPoll.Success, KVPoll.Bootstrapping],
        [KVPoll.Success, KVPoll.Success, KVPoll.Failed, KVPoll.WaitingForInput],
    ]

    def body(rank, links):
        return TPGroup(2, rank, links=links).verdicts(states[rank])

    expected = [Verdict.SUCCESS, Verdict.WAIT, Verdict.FAILED, Verdict.BOOTSTRAPPING]
    assert run_ranks(2, body) == [expected, expected]


def test_a_gone_peer_is_named():
    def body(rank, links):
        if rank == 1:
            links.close()
            return None
        links.barrier()

    error = run_ranks(2, body)[0]
    assert isinstance(error, GroupError) and "rank 1 is gone" in str(error)


def test_a_silent_peer_fails_the_wait_at_its_timeout():
    release = threading.Event()

    def body(rank, links):
        if rank == 1:
            release.wait(10)  # never calls the barrier
            return None
        try:
            links.barrier()
        finally:
            release.set()

    error = run_ranks(2, body, timeout_s=0.2)[0]
    assert isinstance(error, GroupError)
    assert "no word from rank 1 within 0.2s (waiting for a barrier)" in str(error)


def test_ranks_out_of_step_fail_instead_of_misreading():
    def body(rank, links):
        if rank == 0:
            return links.broadcast("commands")
        links.barrier()  # rank 1 took a different path

    results = run_ranks(2, body, timeout_s=1.0)
    assert isinstance(results[1], GroupError)
    assert "rank 0 sent a broadcast where a barrier was due" in str(results[1])


def test_a_group_needs_links_or_a_process_group():
    with pytest.raises(ValueError, match="needs a process group or links"):
        TPGroup(2, 0)


def test_the_host_all_reduce_sums_in_rank_order_with_the_same_bits_everywhere(tmp_path):
    """Ranks on CPUs reduce through files every rank maps, met at the links' barrier; the files
    are gone once every rank has mapped them."""
    generator = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(5, 8, generator=generator) for _ in range(3)] for _ in range(4)]

    def body(rank, links):
        group = TPGroup(3, rank, links=links)
        reduce = SharedHostAllReduce(group, 64, torch.float32, directory=str(tmp_path))
        return [reduce(call[rank].clone()) for call in inputs]  # the halves taken in turn

    results = run_ranks(3, body)
    for call, (a, b, c) in zip(inputs, zip(*results, strict=True), strict=True):
        expected = call[0].clone().add_(call[1]).add_(call[2])
        assert torch.equal(a, expected) and torch.equal(b, expected) and torch.equal(c, expected)
    assert list(tmp_path.iterdir()) == []


def test_a_rank_without_shared_memory_makes_every_rank_keep_the_groups_all_reduce(tmp_path):
    def body(rank, links):
        directory = tmp_path if rank == 0 else tmp_path / "missing"
        SharedHostAllReduce(TPGroup(2, rank, links=links), 64, torch.float32, str(directory))

    results = run_ranks(2, body)
    assert all(isinstance(r, SharedMemoryUnavailable) for r in results)
    assert "rank 1" in str(results[1]) and "missing" in str(results[1])
    assert "another rank" in str(results[0])
    assert list(tmp_path.iterdir()) == []
