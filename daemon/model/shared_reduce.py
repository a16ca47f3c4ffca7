"""All-reduce for TP ranks that share one GPU, where NCCL refuses to run (one GPU per rank).

gloo's all-reduce of a CUDA tensor copies it to host memory, exchanges it over TCP and copies
the sum back: for a prefill chunk's [tokens, hidden] activations, twice per layer, that is most
of the forward. Here every rank writes its part into a buffer that every rank maps through CUDA
IPC, the ranks meet at a barrier on the host (the gloo group, no payload), and each sums the
parts in rank order on the device: one copy and one sum kernel, and the same bits on every rank.

Each rank's buffer has two halves used in turn. A rank refills a half only two calls later,
after a barrier that every rank enters only once its own copy for the call in between is done,
which is queued after its sum of the call before: so nobody still reads a half being refilled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor


class SharedDeviceAllReduce:
    def __init__(
        self, group, rank: int, world: int, device: torch.device, numel: int, dtype: torch.dtype
    ) -> None:
        self.group, self.rank, self.numel = group, rank, numel
        own = torch.zeros(2, numel, dtype=dtype, device=device)  # [half, numel]
        handles: list = [None] * world
        dist.all_gather_object(handles, reduce_tensor(own), group=group)
        # the other ranks' buffers, mapped here; `own` must outlive them (it is kept below)
        self.parts = [own if r == rank else rebuild(*args) for r, (rebuild, args) in
                      enumerate(handles)]  # fmt: skip
        self._half = 0
        self._copied = torch.cuda.Event(blocking=True)  # waiting on it sleeps in the driver

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place (as dist.all_reduce does); tensors larger than the
        buffers go through the group itself."""
        n = x.numel()
        if n > self.numel or not x.is_contiguous():
            dist.all_reduce(x, group=self.group)
            return x
        half, self._half = self._half, self._half ^ 1
        flat = x.view(-1)
        self.parts[self.rank][half, :n].copy_(flat)
        self._copied.record()
        self._copied.synchronize()  # this rank's part is in place ...
        dist.barrier(group=self.group)  # ... and every other rank's too
        parts = [part[half, :n] for part in self.parts]
        flat.copy_(parts[0])
        for part in parts[1:]:  # in rank order on every rank: the same bits everywhere
            flat.add_(part)
        return x
