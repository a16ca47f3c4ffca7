"""All-reduce for the TP ranks of one daemon where the process group's own is slow: ranks that
share one GPU (NCCL refuses to run there: it wants a GPU per rank), and ranks on CPUs.

gloo's all-reduce of a CUDA tensor copies it to host memory, exchanges it over TCP and copies
the sum back: for a prefill chunk's [tokens, hidden] activations, twice per layer, that is most
of the forward; of a host tensor, it waits about a millisecond per call between two processes.
Here every rank writes its part into a buffer that every rank maps (CUDA IPC; on CPUs a file in
/dev/shm), the ranks meet at a barrier on the host (a pipe round trip between a daemon's ranks,
`TPGroup.barrier`; no payload), and each sums the parts in rank order: one copy and one sum,
and the same bits on every rank.

Each rank's buffer has two halves used in turn. A rank refills a half only two calls later,
after a barrier that every rank enters only once its own copy for the call in between is done,
which is queued after its sum of the call before: so nobody still reads a half being refilled.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor


class _SharedAllReduce:
    """Every rank's part in buffers every rank maps (`parts`: [half, numel] each), a barrier,
    and the sum in rank order; the subclasses map the buffers."""

    def __init__(self, group, rank: int, numel: int, barrier: Callable[[], None] | None) -> None:
        """`barrier`: where the ranks meet once their parts are in place (default: the gloo
        group's; a daemon's ranks meet over their pipes, `TPGroup.barrier`)."""
        self.group, self.rank, self.numel = group, rank, numel
        self._barrier = barrier or (lambda: dist.barrier(group=group))
        self.parts: list[torch.Tensor] = []
        self._half = 0

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
        self._copied()  # this rank's part is in place ...
        self._barrier()  # ... and every other rank's too
        parts = [part[half, :n] for part in self.parts]
        flat.copy_(parts[0])
        for part in parts[1:]:  # in rank order on every rank: the same bits everywhere
            flat.add_(part)
        return x

    def _copied(self) -> None:
        """Return once this rank's part is written (a host copy is, on return)."""


class SharedDeviceAllReduce(_SharedAllReduce):
    def __init__(
        self,
        group,
        rank: int,
        world: int,
        device: torch.device,
        numel: int,
        dtype: torch.dtype,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(group, rank, numel, barrier)
        own = torch.zeros(2, numel, dtype=dtype, device=device)  # [half, numel]
        handles: list = [None] * world
        dist.all_gather_object(handles, reduce_tensor(own), group=group)
        # the other ranks' buffers, mapped here; `own` must outlive them (it is kept below)
        self.parts = [own if r == rank else rebuild(*args) for r, (rebuild, args) in
                      enumerate(handles)]  # fmt: skip
        self._event = torch.cuda.Event(blocking=True)  # waiting on it sleeps in the driver

    def _copied(self) -> None:
        self._event.record()
        self._event.synchronize()


class SharedMemoryUnavailable(RuntimeError):
    """Some rank could not allocate its buffer (the reason is the message); every rank raises
    it, so that all of them keep the process group's all-reduce."""


class SharedHostAllReduce(_SharedAllReduce):
    """The same for TP ranks on CPUs (a daemon's ranks share its host), where gloo's
    all-reduce waits about a millisecond per call: the buffers are files in /dev/shm that every
    rank maps, unlinked once all have them (the memory goes with the last process). `group`: the
    rank's TPGroup, which also names the files (its broadcast) and is the barrier. The files'
    memory is allocated up front, so a full /dev/shm (a container's is often 64 MiB) is
    SharedMemoryUnavailable on every rank, never a SIGBUS later."""

    def __init__(self, group, numel: int, dtype: torch.dtype, directory: str = "/dev/shm") -> None:
        super().__init__(group.process_group, group.rank, numel, group.barrier)
        stem = group.broadcast(f"kvferry-reduce-{os.getpid()}-{secrets.token_hex(8)}")
        path = os.path.join(directory, f"{stem}-{group.rank}")
        size = 2 * numel * dtype.itemsize
        fd, error = -1, None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            error = f"rank {group.rank}: {size / 2**20:.1f} MiB in {directory}: {exc}"
        if group.any_rank(error is not None):
            if fd >= 0:
                os.close(fd)
                os.unlink(path)
            raise SharedMemoryUnavailable(error or "another rank could not allocate its buffer")
        try:
            group.barrier()  # every rank's file is there
            self._maps = [self._map(os.path.join(directory, f"{stem}-{r}"), size)
                          for r in range(group.size)]  # fmt: skip
            group.barrier()  # and mapped everywhere
        finally:
            os.close(fd)
            os.unlink(path)
        self.parts = [torch.frombuffer(m, dtype=dtype).view(2, numel) for m in self._maps]

    @staticmethod
    def _map(path: str, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)
