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
after the barrier of the call in between, which every rank enters only after its sum of the
half (on a host, done; on a GPU, queued and followed by an event the refill waits on): so
nobody still reads a half being refilled.

On a GPU nothing here waits for the device. The ranks order their streams with interprocess
CUDA events: a rank records "my part is copied" before it enters the barrier, and waits on the
others' records once it is through; it records "my sum is done" after its sum, and the others'
streams wait on that before they refill the half two calls later. The barrier's pipe messages
put every record before the waits that need it (a wait on an IPC event waits for its latest
record), so the host queues a whole forward while the GPU runs it, instead of stopping twice a
layer until the device has caught up (`ordering="host"`, kept for the benchmark).

Where the ranks' kernels run side by side (a CUDA MPS server: `ordering="device"`, which
`"auto"` picks when a probe finds it so), they meet inside their streams instead, at a barrier
kernel on flag words every rank maps (cuda/tp_barrier.cu): once before a rank refills its part
(every rank's last sum is done) and once after (every rank's part is in). No host takes part,
so a CUDA graph can hold the whole all-reduce, and a forward of TP ranks on one GPU can be
captured as a TP1 forward is. Where the GPU takes the processes' contexts in turns, each such
wait would last until the other context's turn: there the events are used.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from kvferry.cuda.kernels import tp_barrier_kernel
from kvferry.staging.cuda_driver import launch_kernel

log = logging.getLogger(__name__)
ORDERINGS = ("auto", "device", "events", "host")
# "auto" orders the ranks on the device where this many barriers pass within PROBE_LIMIT_S:
# microseconds each where the ranks' kernels run side by side, a context switch each otherwise
PROBE_BARRIERS = 64
PROBE_LIMIT_S = 0.02


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
        self._refill(half)
        self.parts[self.rank][half, :n].copy_(flat)
        self._copied(half)  # this rank's part is in place ...
        self._meet_on_host()  # ... and every other rank's too
        self._others_copied(half)
        parts = [part[half, :n] for part in self.parts]
        flat.copy_(parts[0])
        for part in parts[1:]:  # in rank order on every rank: the same bits everywhere
            flat.add_(part)
        self._summed(half)
        return x

    def _meet_on_host(self) -> None:
        """The ranks' barrier on the host, between their copies and their sums."""
        self._barrier()

    # Where a device orders the ranks' copies and sums; host copies and sums are done on return.
    def _refill(self, half: int) -> None:
        """Before this rank writes its part of `half` again: every rank's sum that read it is
        done."""

    def _copied(self, half: int) -> None:
        """This rank's part of `half` is written, as far as the others will know."""

    def _others_copied(self, half: int) -> None:
        """After the barrier: the others' parts of `half` are written, as far as the sum knows."""

    def _summed(self, half: int) -> None:
        """This rank's sum of `half` is done, as far as the others will know."""


class SharedDeviceAllReduce(_SharedAllReduce):
    """The ranks' parts in CUDA IPC buffers, their streams ordered (`ordering`) by a barrier
    kernel inside them ("device"), by interprocess events ("events"), or by a wait on the host
    for this rank's copy before the barrier ("host": one device sync per call); "auto": "device"
    where every rank finds the ranks' kernels running side by side, else "events".
    `timeout_s`: how long a barrier kernel waits for the other ranks before it gives up (the
    next call then raises)."""

    def __init__(
        self,
        group,
        rank: int,
        world: int,
        device: torch.device,
        numel: int,
        dtype: torch.dtype,
        barrier: Callable[[], None] | None = None,
        ordering: str = "auto",
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(group, rank, numel, barrier)
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, not {ordering!r}")
        self.world, self.timeout_s = world, timeout_s
        with torch.cuda.device(device):
            own = torch.zeros(2, numel, dtype=dtype, device=device)  # [half, numel]
            # [copied, summed] x [half]: recorded here, waited on by the others
            events = [[torch.cuda.Event(interprocess=True) for _ in range(2)] for _ in range(2)]
            flag = torch.zeros(1, dtype=torch.int32, device=device)  # barriers entered
            handles = [[e.ipc_handle() for e in pair] for pair in events]
            torch.cuda.synchronize(device)  # the flag is 0 before another rank reads it
            shared: list = [None] * world
            dist.all_gather_object(shared, (reduce_tensor(own), handles, reduce_tensor(flag)),
                                   group=group)  # fmt: skip
            # the other ranks' buffers, flags and events, opened here; `own` and `flag` must
            # outlive the others' mappings of them (they are kept below)
            self.parts = [own if r == rank else rebuild(*args)
                          for r, ((rebuild, args), _, _) in enumerate(shared)]  # fmt: skip
            self._events = [events if r == rank else
                            [[torch.cuda.Event.from_ipc_handle(device, h) for h in pair]
                             for pair in handles]
                            for r, (_, handles, _) in enumerate(shared)]  # fmt: skip
            self._flags = [flag if r == rank else rebuild(*args)
                           for r, (_, _, (rebuild, args)) in enumerate(shared)]  # fmt: skip
            addresses = [f.data_ptr() for f in self._flags]
            self._flag_addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        self._others = [r for r in range(world) if r != rank]
        self._event = torch.cuda.Event(blocking=True)  # ordering="host": waiting sleeps
        index = device.index
        self._device_index = index if index is not None else torch.cuda.current_device()
        self._error = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # 1 + the rank not met
        self._error_view = self._error.numpy()
        # the barrier's launch (function, parameters): compiled only where it may be used
        mps = ordering == "auto" and bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
        self._meeting = self._barrier_launch() if ordering == "device" or mps else None
        self.ordering = self._pick(mps) if ordering == "auto" else ordering

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can hold a call (no host waits for another rank)."""
        return self.ordering == "device"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._error_view[0]:
            waited_for = int(self._error_view[0]) - 1
            raise RuntimeError(
                f"TP all-reduce: rank {self.rank} waited {self.timeout_s:g} s at the barrier "
                f"for rank {waited_for}, which never came (gone or stuck)"
            )
        return super().__call__(x)

    def _pick(self, mps: bool) -> str:
        """The ordering "auto" means: "device" if every rank finds the ranks' kernels side by
        side (on a CUDA MPS server, `mps`: PROBE_BARRIERS barriers pass within PROBE_LIMIT_S),
        else "events". The barrier is compiled before the ranks meet here, so that none of
        them times another's compile."""
        votes: list = [None] * self.world
        dist.all_gather_object(votes, mps, group=self.group)
        if not all(votes):
            log.info("TP all-reduce ordered by interprocess events: the ranks are not on MPS")
            return "events"
        torch.cuda.synchronize(self._device_index)
        began = time.perf_counter()
        for _ in range(PROBE_BARRIERS):
            self._meet()
        torch.cuda.synchronize(self._device_index)
        took = time.perf_counter() - began
        dist.all_gather_object(votes, (took, int(self._error_view[0])), group=self.group)
        slowest = max(t for t, _ in votes)
        if slowest < PROBE_LIMIT_S and not any(e for _, e in votes):
            log.info("TP all-reduce ordered on the device: %d barriers in %.2f ms",
                     PROBE_BARRIERS, slowest * 1e3)  # fmt: skip
            return "device"
        self._error_view[0] = 0
        log.info(
            "TP all-reduce ordered by interprocess events: %d barriers took %.1f ms (the ranks' "
            "kernels take turns on the GPU)", PROBE_BARRIERS, slowest * 1e3,
        )  # fmt: skip
        return "events"

    def _meet(self) -> None:
        """Queue the barrier kernel on the current stream (cuda/tp_barrier.cu)."""
        function, params, current_stream = self._meeting
        stream = current_stream(self._device_index)
        launch_kernel(function, (1, 1), 32, stream, ctypes.addressof(params[0]))

    def _barrier_launch(self) -> tuple:
        """(the barrier's CUfunction, its parameters, the raw current stream's accessor)."""
        from kvferry.staging.kv_launch import raw_current_stream  # a GPU's module: imported here

        args = (
            ctypes.c_uint64(self._flag_addresses.data_ptr()),
            ctypes.c_int(self.world),
            ctypes.c_int(self.rank),
            ctypes.c_uint64(int(self.timeout_s * 1e9)),
            ctypes.c_uint64(self._error.data_ptr()),
        )
        pointers = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        return tp_barrier_kernel(self._device_index), (pointers, args), raw_current_stream

    def _meet_on_host(self) -> None:
        if self.ordering != "device":  # on the device, the barrier kernels are the meeting
            self._barrier()

    def _refill(self, half: int) -> None:
        if self.ordering == "device":
            self._meet()  # every rank's sum of what it is about to overwrite is done
        elif self.ordering == "events":
            stream = torch.cuda.current_stream()
            for r in self._others:
                stream.wait_event(self._events[r][1][half])

    def _copied(self, half: int) -> None:
        if self.ordering == "device":
            self._meet()  # every rank's part is in
        elif self.ordering == "host":
            self._event.record()
            self._event.synchronize()
        else:
            self._events[self.rank][0][half].record()

    def _others_copied(self, half: int) -> None:
        if self.ordering == "events":
            stream = torch.cuda.current_stream()
            for r in self._others:
                stream.wait_event(self._events[r][0][half])

    def _summed(self, half: int) -> None:
        if self.ordering == "events":
            self._events[self.rank][1][half].record()


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
