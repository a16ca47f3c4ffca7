"""Gathers and scatters of a KV cache in host memory, in native code (host_copy.c): a message's
rows of every plane in one call, on the calling thread, with the GIL let go.

torch's path (kv_copy.py) issues an op per plane to stay on one core (one op over every plane
goes parallel and takes the cores from the next forward); on a message of small rows each op
costs more than its bytes. This one copies row by row with memcpy, one core, no per-plane
overhead. Where no C compiler is at hand, `library()` is None (said once in the log) and the
copies go through torch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import numpy as np

from kvferry.cuda.kernels import KVCopyArgs
from kvferry.staging.native_build import NativeUnavailable, cached_library

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("host_copy.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled copies (CDLL: a call lets the GIL go), or None where they cannot be built."""
    try:
        lib = ctypes.CDLL(str(cached_library(SOURCE)))
    except (NativeUnavailable, OSError) as exc:
        log.warning("CPU gathers and scatters go through torch: %s", exc)
        return None
    lib.kvf_copy_args_size.argtypes, lib.kvf_copy_args_size.restype = (), ctypes.c_size_t
    if lib.kvf_copy_args_size() != ctypes.sizeof(KVCopyArgs):
        log.warning("CPU gathers and scatters go through torch: %s has another KVCopyArgs", SOURCE)
        return None
    copy = lib.kvf_host_copy
    copy.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int)
    copy.restype = None
    return lib


def write_host_copy(
    args: KVCopyArgs,
    planes,
    slots_address: int,
    num_tokens: int,
    head_start: int,
    num_heads: int,
    staging_address: int,
) -> None:
    """Write into `args` the copy of heads [head_start, +num_heads) of `num_tokens` slots
    (contiguous host int64 at `slots_address`, kept alive by the caller until the copy ran)
    between `planes` and the staging bytes at `staging_address`: host_copy.c's parameters."""
    args.planes = planes.pointers.data_ptr()
    args.slots = slots_address
    args.staging = staging_address
    args.num_tokens = num_tokens
    args.row_len, args.slot_len, args.head_offset = planes.row_bytes(head_start, num_heads)


def host_copy(planes, slots: np.ndarray, head_start: int, num_heads: int, staging, gather: bool):
    """Gather (or scatter) now, on this thread; everything given has been checked."""
    args, slots = KVCopyArgs(), np.ascontiguousarray(slots, dtype=np.int64)
    write_host_copy(
        args, planes, slots.ctypes.data, len(slots), head_start, num_heads, staging.data_ptr()
    )
    library().kvf_host_copy(ctypes.byref(args), planes.num_planes, int(gather))
