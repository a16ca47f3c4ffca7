"""Launcher for the gather/scatter RawKernels: picks the vector width, grid and stream, and
launches through the driver with a parameter block it keeps.

A launch is on every data message's path, so its host cost is a transfer's floor. cupy's
`Function.__call__` boxes and type-checks each argument on every call (about 50 µs of an
H200 host's time); here the arguments live in one ctypes structure per device, rewritten in
place, and `cuLaunchKernel` reads them through a fixed array of pointers into it. The index
upload and the launch go through cuda_driver.py, with the GIL held: a launch never hands the
transfer thread's turn to the engine's.

Only imported when a cache lives on a GPU; everything it receives has been validated by
kvferry.staging.kv_copy.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from kvferry.cuda.kernels import VECTOR_TYPES, KVCopyArgs, kv_copy_kernel
from kvferry.staging import cuda_driver as driver
from kvferry.staging.upload import IndexUploader

BLOCK = 512  # threads per block; matches __launch_bounds__ in kv_copy.cu
UNROLL = 2  # vectors per thread per iteration; matches kUnroll in kv_copy.cu
MAX_GRID_X = 1 << 16  # beyond this the kernel's grid-stride loop takes over


class _Launcher:
    """One device's kernels, index uploader and parameter block (used under the uploader's
    lock: the driver copies the parameters before cuLaunchKernel returns)."""

    def __init__(self, device: torch.device) -> None:
        with torch.cuda.device(device):
            self.uploader = IndexUploader(device)
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.args = KVCopyArgs()
        base = ctypes.addressof(self.args)
        pointers = [base + getattr(KVCopyArgs, name).offset for name, _ in KVCopyArgs._fields_]
        self._pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.params = ctypes.addressof(self._pointers)
        self._functions: dict[tuple[int, bool], int] = {}  # (width, gather) -> CUfunction

    def function(self, width: int, gather: bool) -> int:
        """The CUfunction of the kernel for (width, gather), loaded once."""
        function = self._functions.get((width, gather))
        if function is None:  # a cupy RawKernel's `kernel` is its loaded Function
            function = kv_copy_kernel(width, gather, self.index).kernel.ptr
            self._functions[(width, gather)] = function
        return function


def launch_kv_copy(
    planes,
    slots_np: np.ndarray,
    head_start: int,
    num_heads: int,
    staging,
    gather: bool,
    stream_handle: int | None = None,
) -> None:
    """Queue one gather (or scatter) over all planes on `stream_handle` (a raw cudaStream_t),
    else on the current torch stream."""
    if len(slots_np) == 0:
        return
    launcher = _launcher(planes.device)
    stream = stream_handle or raw_current_stream(launcher.index)
    driver.use_device(launcher.index)
    with launcher.uploader.lock:
        device_slots, ticket = launcher.uploader.upload(slots_np, stream)
        try:
            function, grid = write_kv_copy(
                launcher.args, planes, device_slots, len(slots_np), head_start, num_heads,
                staging.data_ptr(), gather,
            )  # fmt: skip
            driver.launch_kernel(function, grid, BLOCK, stream, launcher.params)
        finally:  # the upload region is reclaimed after whatever the stream has queued
            launcher.uploader.done(ticket, stream)


def write_kv_copy(
    args: KVCopyArgs,
    planes,
    device_slots: int,
    num_tokens: int,
    head_start: int,
    num_heads: int,
    staging_address: int,
    gather: bool,
) -> tuple[int, tuple[int, int]]:
    """Write the parameters of a copy of `num_tokens` token slots (int32, already on the device
    at `device_slots`) into `args`: (function, grid) to launch it with, BLOCK threads a block.
    `launch_kv_copy` launches it at once; native code once the bytes to scatter have arrived
    (transport/ucx_native.c)."""
    row_bytes, slot_bytes, offset_bytes = planes.row_bytes(head_start, num_heads)
    width = _vector_width(
        row_bytes, slot_bytes, offset_bytes, staging_address, planes.address_alignment
    )
    row_len = row_bytes // width
    per_plane = num_tokens * row_len
    if per_plane >= 1 << 31:
        raise ValueError(
            f"{num_tokens} tokens x {row_bytes} B per plane is too large for one launch"
        )
    args.planes = planes.pointers.data_ptr()
    args.slots = device_slots
    args.staging = staging_address
    args.num_tokens = num_tokens
    args.row_len = row_len
    args.slot_len = slot_bytes // width
    args.head_offset = offset_bytes // width
    grid = (min(-(-per_plane // (BLOCK * UNROLL)), MAX_GRID_X), planes.num_planes)
    return _launcher(planes.device).function(width, gather), grid


def _vector_width(*quantities: int) -> int:
    """The widest vector width dividing every byte count and address given."""
    for width in VECTOR_TYPES:
        if all(q % width == 0 for q in quantities):
            return width
    raise AssertionError("unreachable: width 1 divides everything")


def uploader_of(device: torch.device) -> IndexUploader:
    """The device's index uploader (use it under its lock)."""
    return _launcher(device).uploader


@functools.cache
def _launcher(device: torch.device) -> _Launcher:
    return _Launcher(device)


def raw_current_stream(device_index: int) -> int:
    """The device's current torch stream as a raw cudaStream_t. The private accessor skips
    building a torch.cuda.Stream (several microseconds per call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream
