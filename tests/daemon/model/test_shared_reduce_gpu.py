"""The all-reduce of TP ranks sharing one GPU: two processes on the GPU sum through CUDA IPC
buffers, the same bits on both ranks, round after round (each buffer half reused), with tensors
larger than the buffers going through gloo.

With `ordering="events"` no rank waits for the device: the host runs ahead and only the
interprocess events order the ranks' streams. So that a missing order shows as a wrong sum,
each round one rank (in turn) queues a long matmul before its part: its copy lands late, and
the other rank's sum, or its refill of a half, would race it."""

import pytest
import torch
import torch.multiprocessing as mp

from ports import free_port

pytestmark = pytest.mark.gpu

SIZES = [1, 100, 4096, 7, 5000, 4096, 33] * 3  # 5000: larger than the buffers


def part(rank: int, round_: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * round_ + rank)
    return torch.randn(size, generator=gen).to(torch.bfloat16)


def rank_main(rank: int, port: int, ordering: str, barrier: str, ends, out) -> None:
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
        for round_, size in enumerate(SIZES):
            x = part(rank, round_, size).to(device)
            if round_ % 2 == rank:  # this rank's stream is behind its host this round
                for _ in range(8):
                    slow = slow @ slow
                    slow /= slow.norm()
            assert reduce(x) is x
            sums.append(x)
        out.put((rank, [s.cpu().tolist() for s in sums]))  # plain values, not shared tensors
        dist.barrier()  # the other rank maps this one's buffer and events until it is done
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "ordering, barrier", [("events", "pipes"), ("events", "gloo"), ("host", "pipes")]
)
def test_ranks_on_one_gpu_sum_through_shared_buffers(ordering, barrier):
    from kvferry.daemon.engine.links import close_links, make_links

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    ends = make_links(ctx, 2)
    args = [(r, port, ordering, barrier, ends, out) for r in range(2)]
    procs = [ctx.Process(target=rank_main, args=a) for a in args]
    for proc in procs:
        proc.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
    finally:
        close_links(ends)
        for proc in procs:
            proc.kill()
    for round_, size in enumerate(SIZES):
        expected = (part(0, round_, size) + part(1, round_, size)).tolist()
        assert results[0][round_] == results[1][round_] == expected, f"round {round_}"
