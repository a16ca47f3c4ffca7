"""Run-time compilation of kvferry's CUDA kernels (cupy.RawModule), cached per process."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path


class KVCopyArgs(ctypes.Structure):
    """kv_copy's parameters, in the kernel's order and types (kv_copy.cu): what a launch's
    parameter array points into, from Python (staging/kv_launch.py) or from native code
    (transport/ucx_native.c)."""

    _fields_ = (
        ("planes", ctypes.c_uint64),
        ("slots", ctypes.c_uint64),
        ("staging", ctypes.c_uint64),
        ("num_tokens", ctypes.c_uint32),
        ("row_len", ctypes.c_uint32),
        ("slot_len", ctypes.c_int64),
        ("head_offset", ctypes.c_int64),
    )


# Vector types by width in bytes; the kernels copy whole vectors.
VECTOR_TYPES = {16: "uint4", 8: "uint2", 4: "unsigned int", 2: "unsigned short", 1: "unsigned char"}


def _source(name: str) -> str:
    # A plain path, not importlib.resources: kvferry.cuda is a namespace package (so the repo's
    # cuda/ folder never shadows NVIDIA's `cuda` namespace), and resource readers reject those.
    return (Path(__file__).parent / name).read_text()


@functools.cache
def _kv_copy_module(device_index: int):
    import cupy  # deferred: CPU-only installs never import cupy

    names = [_kv_copy_name(width, gather) for width in VECTOR_TYPES for gather in (True, False)]
    module = cupy.RawModule(
        code=_source("kv_copy.cu"), options=("-std=c++17",), name_expressions=names
    )
    with cupy.cuda.Device(device_index):
        module.compile()
    return module


def _kv_copy_name(width: int, gather: bool) -> str:
    return f"kv_copy<{VECTOR_TYPES[width]}, {'true' if gather else 'false'}>"


@functools.cache
def kv_copy_kernel(width: int, gather: bool, device_index: int):
    """The gather (or scatter) kernel moving `width`-byte vectors on a device, compiled once."""
    import cupy

    with cupy.cuda.Device(device_index):
        return _kv_copy_module(device_index).get_function(_kv_copy_name(width, gather))


def tp_barrier_kernel(device_index: int) -> int:
    """The CUfunction of tp_barrier.cu's barrier on a device, compiled and loaded once."""
    return _tp_barrier(device_index)[1]


@functools.cache
def _tp_barrier(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):  # the module is kept: its functions live as long
        module = cupy.RawModule(code=_source("tp_barrier.cu"), options=("-std=c++17",))
        return module, module.get_function("tp_barrier").kernel.ptr
