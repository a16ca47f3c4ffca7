"""The RawKernel path against the torch path, bit for bit, on a GPU."""

import pytest
import torch

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.kv_copy import KVPlanes, gather, scatter
from kvferry.staging.plan import plan_head_transfers, rank_heads
from support.kvsim import bits, random_bits, tp_ranks, transfer

pytestmark = pytest.mark.gpu

CASES = [  # dtype, heads, head_dim, head_start, num_heads
    (torch.bfloat16, 8, 128, 2, 2),
    (torch.float16, 8, 128, 0, 8),
    (torch.float32, 4, 64, 3, 1),
    (torch.float8_e4m3fn, 8, 128, 1, 3),
    (torch.bfloat16, 3, 5, 1, 1),  # 10-byte rows: 2-byte vectors
    (torch.float8_e5m2, 2, 7, 1, 1),  # 7-byte rows: byte copies
    (torch.bfloat16, 1, 576, 0, 1),  # MLA latent
]


@pytest.mark.parametrize("dtype, heads, head_dim, head_start, num_heads", CASES)
def test_kernel_matches_torch(dtype, heads, head_dim, head_start, num_heads):
    gen = torch.Generator().manual_seed(heads * head_dim)
    cache = random_bits((10, 300, heads, head_dim), dtype, gen).cuda()
    planes = KVPlanes.from_cache(cache)
    slots = torch.randperm(300, generator=gen)[:257]
    nbytes = planes.staging_bytes(257, num_heads)
    by_kernel = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    by_torch = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    gather(planes, slots, head_start, num_heads, by_kernel, backend="cuda")
    gather(planes, slots, head_start, num_heads, by_torch, backend="torch")
    assert torch.equal(by_kernel, by_torch)

    target = torch.zeros_like(cache)
    expected = torch.zeros_like(cache)
    scatter(by_kernel, KVPlanes.from_cache(target), slots, head_start, num_heads, backend="cuda")
    scatter(by_torch, KVPlanes.from_cache(expected), slots, head_start, num_heads, backend="torch")
    assert torch.equal(bits(target), bits(expected))


def test_misaligned_staging_region_still_exact():
    gen = torch.Generator().manual_seed(5)
    cache = random_bits((4, 64, 8, 128), torch.bfloat16, gen).cuda()
    planes = KVPlanes.from_cache(cache)
    slots = list(range(63, -1, -1))
    backing = torch.empty(planes.staging_bytes(64, 2) + 2, dtype=torch.uint8, device="cuda")
    out = backing[2:]  # 2-byte aligned only
    gather(planes, slots, 4, 2, out, backend="cuda")
    assert torch.equal(out, bits(cache[:, slots, 4:6]).flatten())


@pytest.mark.parametrize("heads, src_tp, dst_tp", [(8, 4, 1), (8, 1, 2), (2, 4, 1), (2, 1, 4)])
def test_tp_round_trip_on_gpu(heads, src_tp, dst_tp):
    gen = torch.Generator().manual_seed(11)
    planes, tokens, head_dim = 8, 1000, 128
    kv = random_bits((planes, tokens, heads, head_dim), torch.bfloat16, gen).cuda()
    src = tp_ranks(
        heads, src_tp, planes, tokens, head_dim, torch.bfloat16, 16, seed=2, device="cuda"
    )
    dst = tp_ranks(
        heads, dst_tp, planes, tokens, head_dim, torch.bfloat16, 64, seed=7, device="cuda"
    )
    for r, rank in enumerate(src):
        held = rank_heads(heads, src_tp, r)
        rank.fill(kv[:, :, held.start : held.stop])
    transfer(src, dst, plan_head_transfers(heads, src_tp, dst_tp), tokens, backend="cuda")
    for r, rank in enumerate(dst):
        held = rank_heads(heads, dst_tp, r)
        assert torch.equal(bits(rank.read()), bits(kv[:, :, held.start : held.stop]))


def test_side_stream_is_honoured():
    gen = torch.Generator().manual_seed(9)
    cache = random_bits((16, 4096, 8, 128), torch.bfloat16, gen).cuda()
    planes = KVPlanes.from_cache(cache)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = torch.empty(planes.staging_bytes(4096, 8), dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(side):
        gather(planes, range(4096), 0, 8, out, backend="cuda")
        done = torch.cuda.Event()
        done.record()
    torch.cuda.current_stream().wait_event(done)
    assert torch.equal(out, bits(cache).flatten())


@pytest.mark.parametrize("vmm", [False, True])
def test_device_staging_buffer(vmm):
    gen = torch.Generator().manual_seed(1)
    cache = random_bits((4, 128, 2, 64), torch.float16, gen).cuda()
    planes = KVPlanes.from_cache(cache)
    buf = StagingBuffer(1 << 20, "cuda", vmm=vmm)
    nbytes = planes.staging_bytes(128, 1)
    offset = buf.alloc(nbytes)
    region = buf.view(offset, nbytes)
    gather(planes, range(128), 1, 1, region, backend="cuda")
    assert torch.equal(region, bits(cache[:, :, 1:2]).flatten())
    buf.free(offset)
    assert buf.ring.used_bytes == 0
    buf.close()


def test_launches_never_synchronise_the_host():
    gen = torch.Generator().manual_seed(4)
    cache = random_bits((8, 512, 4, 64), torch.bfloat16, gen).cuda()
    planes = KVPlanes.from_cache(cache)
    out = torch.empty(planes.staging_bytes(512, 2), dtype=torch.uint8, device="cuda")
    gather(planes, range(512), 0, 2, out, backend="cuda")  # compile and cache outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gather(planes, range(512), 2, 2, out, backend="cuda")
        scatter(out, planes, range(511, -1, -1), 0, 2, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_index_uploader_waits_when_its_ring_is_full():
    import cupy
    import numpy as np

    from kvferry.staging.upload import IndexUploader

    uploader = IndexUploader(torch.device("cuda:0"), capacity=1024)
    side = torch.cuda.Stream()
    stream = side.cuda_stream
    copies = []
    with torch.cuda.stream(side):
        for first in (0, 1000):  # 800 B each, aligned to 1024: only one fits at a time
            address, ticket = uploader.upload(np.arange(first, first + 200, dtype=np.int32), stream)
            memory = cupy.cuda.UnownedMemory(address, 800, uploader)
            region = cupy.ndarray((200,), cupy.int32, cupy.cuda.MemoryPointer(memory, 0))
            copies.append(torch.as_tensor(region, device="cuda").clone())
            torch.cuda._sleep(20_000_000)  # keeps the region in flight a while
            uploader.done(ticket, stream)
    side.synchronize()
    assert uploader.waits == 1
    assert torch.equal(copies[0].cpu(), torch.arange(200, dtype=torch.int32))
    assert torch.equal(copies[1].cpu(), torch.arange(1000, 1200, dtype=torch.int32))


def test_index_uploader_copies_more_than_its_ring_into_memory_of_the_callers():
    import numpy as np

    from kvferry.staging.upload import IndexUploader

    uploader = IndexUploader(torch.device("cuda:0"), capacity=1024)  # 128 values a piece
    side = torch.cuda.Stream()
    values = np.arange(1000, 1700, dtype=np.int64)  # cast to int32 on the way
    target = torch.zeros(700, dtype=torch.int32, device="cuda")
    uploader.upload_to(target.data_ptr(), values, side.cuda_stream)
    side.synchronize()
    assert torch.equal(target.cpu(), torch.arange(1000, 1700, dtype=torch.int32))


def test_copy_stream_descriptor_turns_readable_when_a_copy_finishes():
    import select

    from kvferry.staging.copy_stream import CopyStream, Fence

    gen = torch.Generator().manual_seed(6)
    cache = random_bits((8, 1024, 4, 64), torch.bfloat16, gen).cuda()
    planes = KVPlanes.from_cache(cache)
    out = torch.empty(planes.staging_bytes(1024, 2), dtype=torch.uint8, device="cuda")
    copies = CopyStream(torch.device("cuda"))
    try:
        gate = torch.cuda.Event()
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda._sleep(200_000_000)  # the copy waits behind this (about 0.1 s)
            gate.record()
        fence = copies.gather(planes, range(1024), 1, 2, out, after=Fence(gate))
        assert not select.select([copies.wake_fd], [], [], 0)[0]  # still waiting for the gate
        assert select.select([copies.wake_fd], [], [], 30)[0]  # woken, nobody polling
        assert fence.done()
        copies.collect()
        assert fence.event is None  # fired: its event went back to the pool
        assert not select.select([copies.wake_fd], [], [], 0)[0]  # cleared
        assert torch.equal(out, bits(cache[:, :, 1:3]).flatten())
        again = copies.gather(planes, range(1024), 0, 2, out)  # the pooled event, recorded again
        assert select.select([copies.wake_fd], [], [], 30)[0]
        copies.collect()
        assert again.done() and again.event is None

        target = torch.zeros_like(cache)
        quiet = copies.scatter(out, KVPlanes.from_cache(target), range(1024), 0, 2, wake=False)
        torch.cuda.synchronize()
        assert quiet.done()
        assert not select.select([copies.wake_fd], [], [], 0.2)[0]  # it asked for no wake
        copies.wake_when_done()  # now someone waits for it
        assert select.select([copies.wake_fd], [], [], 30)[0]
        copies.collect()
        assert quiet.event is None
        assert torch.equal(bits(target[:, :, 0:2]), bits(cache[:, :, 0:2]))
    finally:
        copies.close()
