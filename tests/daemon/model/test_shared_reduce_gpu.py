"""The all-reduce of TP ranks sharing one GPU: two processes on the GPU sum through CUDA IPC
buffers, the same bits on both ranks, round after round (each buffer half reused), with tensors
larger than the buffers going through gloo."""

import pytest
import torch
import torch.multiprocessing as mp

from ports import free_port

pytestmark = pytest.mark.gpu

SIZES = [1, 100, 4096, 7, 5000, 4096, 33]  # 5000: larger than the buffers


def part(rank: int, round_: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * round_ + rank)
    return torch.randn(size, generator=gen).to(torch.bfloat16)


def rank_main(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from kvferry.daemon.model.shared_reduce import SharedDeviceAllReduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        device = torch.device("cuda", 0)
        reduce = SharedDeviceAllReduce(dist.group.WORLD, rank, 2, device, 4096, torch.bfloat16)
        sums = []
        for round_, size in enumerate(SIZES):
            x = part(rank, round_, size).to(device)
            assert reduce(x) is x
            sums.append(x.cpu().tolist())  # plain values: a tensor would be shared by fd
        out.put((rank, sums))
        dist.barrier()  # the other rank maps this one's buffer until it is done
    finally:
        dist.destroy_process_group()


def test_ranks_on_one_gpu_sum_through_shared_buffers():
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    for round_, size in enumerate(SIZES):
        expected = (part(0, round_, size) + part(1, round_, size)).tolist()
        assert results[0][round_] == results[1][round_] == expected
