"""The all-reduce of TP ranks sharing one GPU: two processes on the GPU sum through CUDA IPC
buffers, the same bits on both ranks, round after round (each buffer half reused), with tensors
larger than the buffers going through gloo.

With `ordering="events"` or `"device"` no rank waits for the device: the host runs ahead and
only the interprocess events, or the barrier kernels inside the streams, order the ranks. So
that a missing order shows as a wrong sum, each round one rank (in turn) queues a long matmul
before its part: its copy lands late, and the other rank's sum, or its refill of a half, would
race it. The barrier kernels need the ranks' kernels side by side: those runs are on a private
CUDA MPS server, where "auto" must pick them, and where the all-reduce must also work inside a
CUDA graph; without MPS "auto" must keep the events."""

import pytest
import torch
import torch.multiprocessing as mp

from ports import free_port

pytestmark = pytest.mark.gpu

SIZES = [1, 100, 4096, 7, 5000, 4096, 33] * 3  # 5000: larger than the buffers
GRAPH_SIZE = 3000  # the tensor a CUDA graph's all-reduces sum, rounds after rounds
GRAPH_ROUNDS = 6


def part(rank: int, round_: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * round_ + rank)
    return torch.randn(size, generator=gen).to(torch.bfloat16)


def lag(slow: torch.Tensor) -> torch.Tensor:
    """Queue work that holds this rank's stream back a while."""
    for _ in range(8):
        slow = slow @ slow
        slow /= slow.norm()
    return slow


def rank_main(rank: int, port: int, ordering: str, barrier: str, graph: bool, ends, out) -> None:
    import torch.distributed as dist

    from kvferry.daemon.engine.links import Links
    from kvferry.daemon.model.shared_reduce import SharedDeviceAllReduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        meet = Links(rank, ends[rank], 60.0).barrier if barrier == "pipes" else None
        reduce = SharedDeviceAllReduce(
            dist.group.WORLD, rank, 2, device, 4096, torch.bfloat16, meet, ordering
        )
        slow = torch.randn(4096, 4096, device=device)
        sums = []
        if graph:  # two all-reduces in one graph, replayed round after round
            static = torch.zeros(GRAPH_SIZE, dtype=torch.bfloat16, device=device)
            first = torch.zeros_like(static)
            reduce(static.clone())  # warm-up outside the graph, on both ranks alike
            torch.cuda.synchronize()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                first.copy_(reduce(static))
                reduce(static)
            for round_ in range(GRAPH_ROUNDS):
                if round_ % 2 == rank:
                    slow = lag(slow)
                static.copy_(part(rank, round_, GRAPH_SIZE).to(device))
                captured.replay()
                sums += [first.clone(), static.clone()]
        else:
            for round_, size in enumerate(SIZES):
                x = part(rank, round_, size).to(device)
                if round_ % 2 == rank:  # this rank's stream is behind its host this round
                    slow = lag(slow)
                assert reduce(x) is x
                sums.append(x)
        torch.cuda.synchronize()
        out.put((rank, reduce.ordering, [s.cpu().tolist() for s in sums]))  # plain values
        dist.barrier()  # the other rank maps this one's buffer and events until it is done
    finally:
        dist.destroy_process_group()


def run_ranks(ordering: str, barrier: str, graph: bool = False) -> tuple[set, dict]:
    """Both ranks' orderings and sums."""
    from kvferry.daemon.engine.links import close_links, make_links

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    ends = make_links(ctx, 2)
    args = [(r, port, ordering, barrier, graph, ends, out) for r in range(2)]
    procs = [ctx.Process(target=rank_main, args=a) for a in args]
    for proc in procs:
        proc.start()
    try:
        results = {rank: (used, sums) for rank, used, sums in (out.get(timeout=120) for _ in procs)}
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
    finally:
        close_links(ends)
        for proc in procs:
            proc.kill()
    return {used for used, _ in results.values()}, {r: sums for r, (_, sums) in results.items()}


@pytest.fixture
def on_mps(monkeypatch):
    """The ranks spawned in the test run on a private CUDA MPS server."""
    from kvferry.daemon.cli.mps import NoMPS, mps_server

    try:
        with mps_server() as env:
            for name in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
                monkeypatch.setenv(name, env[name])
            yield
    except NoMPS as exc:
        pytest.skip(f"no CUDA MPS server on this machine: {exc}")


def check_sums(results: dict) -> None:
    for round_, size in enumerate(SIZES):
        expected = (part(0, round_, size) + part(1, round_, size)).tolist()
        assert results[0][round_] == results[1][round_] == expected, f"round {round_}"


@pytest.mark.parametrize(
    "ordering, barrier", [("events", "pipes"), ("events", "gloo"), ("host", "pipes")]
)
def test_ranks_on_one_gpu_sum_through_shared_buffers(ordering, barrier):
    used, results = run_ranks(ordering, barrier)
    assert used == {ordering}
    check_sums(results)


def test_auto_keeps_events_where_the_ranks_take_turns(monkeypatch):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    used, results = run_ranks("auto", "pipes")
    assert used == {"events"}
    check_sums(results)


@pytest.mark.parametrize("ordering", ["device", "auto"])
def test_ranks_on_mps_meet_on_the_device(on_mps, ordering):
    used, results = run_ranks(ordering, "pipes")
    assert used == {"device"}
    check_sums(results)


def test_all_reduces_on_the_device_replay_in_a_cuda_graph(on_mps):
    used, results = run_ranks("device", "pipes", graph=True)
    assert used == {"device"}
    for round_ in range(GRAPH_ROUNDS):
        once = part(0, round_, GRAPH_SIZE) + part(1, round_, GRAPH_SIZE)
        twice = once + once  # the second all-reduce sums the first's result on both ranks
        got = [results[rank][2 * round_ : 2 * round_ + 2] for rank in (0, 1)]
        assert got[0] == got[1] == [once.tolist(), twice.tolist()], f"round {round_}"
