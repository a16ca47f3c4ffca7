"""A rank's staging buffer: one pre-allocated byte region carved up by a RingAllocator."""

from __future__ import annotations

import torch

from kvferry.staging.ring import RingAllocator


class StagingBuffer:
    """`capacity` bytes on `device`, with ring-allocated regions and zero-copy typed views.

    Device memory comes from torch's allocator (plain cudaMalloc segments, which UCX cuda_ipc
    can export) unless `vmm=True` asks for a cuMemCreate allocation with a shareable handle.
    Host memory is pinned whenever CUDA is available, so copies to and from it run async.
    """

    def __init__(
        self,
        capacity: int,
        device: str | torch.device = "cpu",
        *,
        alignment: int = 256,
        vmm: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.ring = RingAllocator(capacity, alignment)  # validates capacity and alignment first
        self._vmm = None
        if vmm:
            from kvferry.staging.vmm import VMMAllocation  # deferred: needs the CUDA driver

            if self.device.type != "cuda":
                raise ValueError(f"vmm=True needs a CUDA device, got {self.device}")
            self._vmm = VMMAllocation(capacity, self.device)
            self.storage = self._vmm.as_tensor()
        elif self.device.type == "cuda":
            self.storage = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        else:
            pin = torch.cuda.is_available()
            self.storage = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        self.address = self.storage.data_ptr()

    @property
    def capacity(self) -> int:
        return self.ring.capacity

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new region, or None when the ring has no room now (the caller queues)."""
        return self.ring.alloc(nbytes)

    def free(self, offset: int) -> None:
        self.ring.free(offset)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """The bytes [offset, offset + nbytes) as a flat `dtype` tensor, without a copy.

        Offsets and lengths may come from a peer: anything outside the buffer or misaligned for
        `dtype` raises ValueError.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.capacity:
            raise ValueError(
                f"region [{offset}, {offset + nbytes}) is outside a staging buffer "
                f"of {self.capacity} bytes"
            )
        if offset % dtype.itemsize or nbytes % dtype.itemsize:
            raise ValueError(f"region at {offset} of {nbytes} bytes is misaligned for {dtype}")
        return self.storage.narrow(0, offset, nbytes).view(dtype)

    def region(self, offset: int, nbytes: int) -> Region:
        """The bytes [offset, offset + nbytes) as a Region (checked as `view` checks them)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.capacity:
            self.view(offset, nbytes)  # raises, naming the region
        return Region(self, offset, nbytes)

    def close(self) -> None:
        """Release the memory; views taken earlier must no longer be used."""
        self.storage = torch.empty(0, dtype=torch.uint8)
        if self._vmm is not None:
            self._vmm.close()
            self._vmm = None


class Region:
    """A region of a staging buffer, as the gather, the scatter and the data plane read it:
    its address, its size and its device, without a tensor.

    Making a tensor view costs a torch call, and torch's bindings let the GIL go around every
    call: a transfer thread sharing its process with an engine's forward then waits a switch
    interval to get it back, once per data message. The few tensor methods the consumers read
    are answered from the fields; `view(dtype)` makes the tensor, for the paths that index
    with torch (a cache on a CPU, the loopback data plane)."""

    __slots__ = ("_buffer", "device", "nbytes", "offset")

    def __init__(self, buffer: StagingBuffer, offset: int, nbytes: int) -> None:
        self._buffer, self.offset, self.nbytes = buffer, offset, nbytes
        self.device = buffer.device

    def data_ptr(self) -> int:
        return self._buffer.address + self.offset

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1

    def is_contiguous(self) -> bool:
        return True

    def view(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """The region as a flat `dtype` tensor (a view: no copy)."""
        return self._buffer.view(self.offset, self.nbytes, dtype)
