"""Launcher for the gather/scatter RawKernels: picks the vector width, grid and stream.

Only imported when a cache lives on a GPU; everything it receives has been validated by
kvferry.staging.kv_copy.
"""

from __future__ import annotations

import functools

import cupy
import numpy as np
import torch

from kvferry.cuda.kernels import VECTOR_TYPES, kv_copy_kernel
from kvferry.staging.upload import IndexUploader

BLOCK = 512  # threads per block; matches __launch_bounds__ in kv_copy.cu
UNROLL = 2  # vectors per thread per iteration; matches kUnroll in kv_copy.cu
MAX_GRID_X = 1 << 16  # beyond this the kernel's grid-stride loop takes over


def launch_kv_copy(
    planes,
    slots_np: np.ndarray,
    head_start: int,
    num_heads: int,
    staging: torch.Tensor,
    gather: bool,
    stream_handle: int | None = None,
) -> None:
    """Queue one gather (or scatter) over all planes on `stream_handle` (a raw cudaStream_t),
    else on the current torch stream."""
    if len(slots_np) == 0:
        return
    row_bytes = num_heads * planes.head_dim * planes.itemsize
    slot_bytes = planes.num_heads * planes.head_dim * planes.itemsize
    offset_bytes = head_start * planes.head_dim * planes.itemsize
    width = _vector_width(
        row_bytes, slot_bytes, offset_bytes, staging.data_ptr(), planes.address_alignment
    )
    row_len = row_bytes // width
    per_plane = len(slots_np) * row_len
    if per_plane >= 1 << 31:
        raise ValueError(
            f"{len(slots_np)} tokens x {row_bytes} B per plane is too large for one launch"
        )
    grid = (min(-(-per_plane // (BLOCK * UNROLL)), MAX_GRID_X), planes.num_planes)
    uploader = _uploader(planes.device)
    kernel = kv_copy_kernel(width, gather, planes.device.index)
    index = planes.device.index
    stream = _stream_for(stream_handle, index) if stream_handle else _current_stream(index)
    with uploader.lock:
        device_slots, ticket = uploader.upload(slots_np.astype(np.int32), stream)
        args = (
            np.uint64(planes.pointers.data_ptr()),
            np.uint64(device_slots),
            np.uint64(staging.data_ptr()),
            np.uint32(len(slots_np)),
            np.uint32(row_len),
            np.int64(slot_bytes // width),
            np.int64(offset_bytes // width),
        )
        try:
            kernel(grid, (BLOCK,), args, stream=stream)
        finally:  # the upload region is reclaimed after whatever the stream has queued
            uploader.done(ticket, stream)


def _vector_width(*quantities: int) -> int:
    """The widest vector width dividing every byte count and address given."""
    for width in VECTOR_TYPES:
        if all(q % width == 0 for q in quantities):
            return width
    raise AssertionError("unreachable: width 1 divides everything")


@functools.cache
def _uploader(device: torch.device) -> IndexUploader:
    with torch.cuda.device(device):
        return IndexUploader(device)


class _StreamHandle:
    """A raw cudaStream_t speaking the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@functools.lru_cache(maxsize=64)
def _stream_for(handle: int, device_index: int) -> cupy.cuda.Stream:
    if hasattr(cupy.cuda.Stream, "from_external"):
        with cupy.cuda.Device(device_index):
            return cupy.cuda.Stream.from_external(_StreamHandle(handle))
    return cupy.cuda.ExternalStream(handle, device_index)  # cupy < 14


def _current_stream(device_index: int) -> cupy.cuda.Stream:
    """torch's current stream on the device, as a cupy stream (cached per raw handle)."""
    return _stream_for(_raw_current_stream(device_index), device_index)


def _raw_current_stream(device_index: int) -> int:
    # The private accessor skips building a torch.cuda.Stream (several microseconds per call).
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream
