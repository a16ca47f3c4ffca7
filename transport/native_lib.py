"""The C library of the native data path (ucx_native.c): its build, the ctypes mirrors of its
records, and its entry points.

The C file is compiled at first use against the headers of the libucx wheel that ucxx loads,
and cached (staging/native_build.py). `build()` raises NativeUnavailable with the reason when
that cannot be done.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from kvferry.cuda.kernels import KVCopyArgs
from kvferry.staging.native_build import NativeUnavailable, cached_library

SOURCE = Path(__file__).with_name("ucx_native.c")


class Launch(ctypes.Structure):
    """The head of one operation's C record (kvf_op): the copy to run once a receive's bytes
    are in, which its owner writes before posting it: a kernel launch (`function`), or with
    `host` set a copy on the host (`args` in bytes, `grid_y` planes); neither: nothing."""

    _fields_ = (
        ("function", ctypes.c_void_p),
        ("stream", ctypes.c_void_p),
        ("event", ctypes.c_void_p),
        ("grid_x", ctypes.c_uint32),
        ("grid_y", ctypes.c_uint32),
        ("block", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("host", ctypes.c_uint32),  # 1: a host copy (staging/host_copy.c) instead of a launch
        ("expected", ctypes.c_uint64),
        ("args", KVCopyArgs),
    )


class PollFd(ctypes.Structure):
    """struct pollfd: what `NativeOps.sleep` watches, and found readable."""

    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


class Op(ctypes.Structure):
    """kvf_op of ucx_native.c (its size is checked at load)."""

    _fields_ = (
        ("launch", Launch),
        ("params", ctypes.c_void_p * 7),
        ("plane", ctypes.c_void_p),
        ("request", ctypes.c_void_p),
        ("state", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("launch_status", ctypes.c_int32),
        ("launched", ctypes.c_int32),
        ("length", ctypes.c_uint64),
        ("done_ns", ctypes.c_uint64),  # CLOCK_REALTIME of its completion
        ("group", ctypes.c_uint32),  # 1 + its group's index; 0: none
        ("loud", ctypes.c_uint32),
    )


class Plane(ctypes.Structure):
    """kvf_plane of ucx_native.c (its size is checked at load)."""

    _fields_ = (
        ("worker", ctypes.c_void_p),
        ("launch", ctypes.c_void_p),
        ("record", ctypes.c_void_p),
        ("host_copy", ctypes.c_void_p),
        ("ops", ctypes.c_void_p),
        ("done", ctypes.c_void_p),
        ("capacity", ctypes.c_uint32),
        ("done_head", ctypes.c_uint32),
        ("done_count", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("sleep_events", ctypes.c_uint64),
        ("sleep_ucx_ns", ctypes.c_uint64),
        ("context", ctypes.c_void_p),
        ("memh", ctypes.c_void_p),
        ("region_base", ctypes.c_uint64),
        ("region_length", ctypes.c_uint64),
        ("memory_type", ctypes.c_uint32),
        ("_pad2", ctypes.c_uint32),
        ("groups", ctypes.c_void_p),
        ("loud_count", ctypes.c_uint32),
        ("all_loud", ctypes.c_uint32),
    )


def build() -> ctypes.PyDLL:
    """The compiled library, loaded (built first if the cache lacks it). PyDLL: its calls keep
    the GIL, as a transfer thread's calls must (transport/ucx.py)."""
    try:
        return _load()
    except NativeUnavailable:
        raise
    except OSError as exc:
        raise NativeUnavailable(f"{type(exc).__name__}: {exc}") from exc


@functools.cache
def _load() -> ctypes.PyDLL:
    include, libdir = _ucx_dirs()
    flags = [f"-I{include}", f"-L{libdir}", "-lucp", "-lucs", f"-Wl,-rpath,{libdir}"]
    target = cached_library(SOURCE, flags)
    lib = ctypes.PyDLL(str(target))
    p, u32, u64 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64
    signatures = {
        "kvf_op_size": ((), ctypes.c_size_t),
        "kvf_plane_size": ((), ctypes.c_size_t),
        "kvf_init": ((p,), None),
        "kvf_peek": ((p, p), ctypes.c_int),
        "kvf_post": ((p, u32, u64, p, u64), ctypes.c_int),
        "kvf_expect": ((p, u32, u64, p, u64), ctypes.c_int),
        "kvf_cancel": ((p, u32), None),
        "kvf_send": ((p, u32, p, u64, p, u64), ctypes.c_int),
        "kvf_reap": ((p, p, u32), u32),
        "kvf_cancel_all": ((p,), None),
        "kvf_register": ((p, p, p, u64, u32), ctypes.c_int),
        "kvf_deregister": ((p,), None),
        "kvf_group_open": ((p, u32), None),
        "kvf_group_close": ((p, u32), u32),
        "kvf_all_loud": ((p, u32), None),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    sizes = (lib.kvf_op_size(), lib.kvf_plane_size())
    if sizes != (ctypes.sizeof(Op), ctypes.sizeof(Plane)):
        raise NativeUnavailable(
            f"{target} has record sizes {sizes}, this module expects "
            f"{(ctypes.sizeof(Op), ctypes.sizeof(Plane))}"
        )
    return lib


@functools.cache
def sleeper():
    """kvf_sleep, through a CDLL handle of the same library: ctypes lets the GIL go for the
    call, as a sleep must (every other call keeps it, `build`)."""
    p, i32, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    function = ctypes.CDLL(build()._name).kvf_sleep  # the library built and checked
    function.argtypes = (p, p, u32, i32, i32, i32)
    function.restype = i32
    return function


def _ucx_dirs() -> tuple[Path, Path]:
    try:
        import libucx  # the UCX wheel ucxx loads
    except ImportError as exc:
        raise NativeUnavailable("the libucx wheel is not installed") from exc
    libucx.load_library()
    root = Path(libucx.__file__).parent
    include, libdir = root / "include", root / "lib"
    if not (include / "ucp" / "api" / "ucp.h").is_file():
        raise NativeUnavailable(f"no UCX headers under {include}")
    return include, libdir


@functools.cache
def _ucs() -> ctypes.CDLL:
    import libucx

    ucs = ctypes.CDLL(str(Path(libucx.__file__).parent / "lib" / "libucs.so"))
    ucs.ucs_status_string.argtypes, ucs.ucs_status_string.restype = (ctypes.c_int,), ctypes.c_char_p
    return ucs


def status_string(status: int) -> str:
    return (_ucs().ucs_status_string(status) or b"unknown").decode()
