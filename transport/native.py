"""Native sends and receives for the UCX data plane (ucx_native.c): a probe, a receive whose
completion callback launches the message's scatter with no Python in between, a send, one
call per turn that takes every completion, and the transfer thread's sleep, which takes the
worker's events without the GIL.

The C file is compiled at first use against the headers of the libucx wheel that ucxx loads,
and cached (staging/native_build.py). `build()` raises NativeUnavailable with the reason when
that cannot be done; the data plane then sends and receives through ucxx's API instead, and
says so in its log.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from kvferry.cuda.kernels import KVCopyArgs
from kvferry.staging.native_build import NativeUnavailable, cached_library
from kvferry.transport.dataplane import DataOp, data_failure
from kvferry.transport.failure import Failure

SOURCE = Path(__file__).with_name("ucx_native.c")
CAPACITY = 4096  # operations in flight at once; past this one goes through ucxx
_POSTED_OK, _NO_MESSAGE = 0, 1
WOKE_TIMER, WOKE_DATA, WOKE_FDS = 0, 1, 2  # why `NativeOps.sleep` returned
UCS_OK = 0
UCS_ERR_CANCELED = -16
# UCS statuses that mean the peer's process or link went away (ucs/type/status.h)
_PEER_GONE = frozenset({-6, -25, -80})  # UNREACHABLE, CONNECTION_RESET, ENDPOINT_TIMEOUT
_ORPHANED: list = []  # records of closed planes that UCX may still complete into


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


class _Op(ctypes.Structure):
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
    )


class _Plane(ctypes.Structure):
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
    )


class NativeOp(DataOp):
    """A send or receive posted by NativeOps; done once a progress has reaped it."""

    __slots__ = (
        "_buffer", "_ops", "finished", "kind", "launch_status", "launched", "op_id", "short",
        "status",
    )  # fmt: skip

    def __init__(self, ops: NativeOps, kind: str, buffer, op_id: int) -> None:
        self._ops, self.kind, self.op_id = ops, kind, op_id
        self._buffer = buffer  # the memory stays alive while UCX may touch it
        self.finished = False
        self.status = UCS_OK
        self.launch_status = 0
        self.launched = False  # its copy is queued on the copy stream
        self.short: tuple[int, int] | None = None  # (received, expected) bytes: not copied

    def done(self) -> bool:
        return self.finished

    @property
    def cancelled(self) -> bool:
        return self.finished and self.status == UCS_ERR_CANCELED

    def error(self) -> Failure | None:
        if self.status != UCS_OK:
            reason = f"UCX {self.kind} failed: {self._ops.status_name(self.status)}"
            return data_failure(reason, peer_gone=self.status in _PEER_GONE)
        if self.launch_status:
            return data_failure(f"the scatter's launch failed with CUDA error {self.launch_status}")
        if self.short is not None:
            received, expected = self.short
            return data_failure(f"received {received} bytes where {expected} were expected")
        return None


class NativeOps:
    """One UCX worker's sends and receives through ucx_native.c. Used from the worker's thread
    only. Each operation takes a record until it is reaped; past CAPACITY in flight, `record`
    answers None and the caller goes through ucxx.

    `launch`, `record`: addresses of the CUDA driver's cuLaunchKernel and cuEventRecord, for
    receives that launch a copy on completion (0 on a host without CUDA); `host_copy`: that of
    staging/host_copy.c's kvf_host_copy, for receives that copy on the host (0: none)."""

    def __init__(self, worker: int, launch: int = 0, record: int = 0, host_copy: int = 0) -> None:
        lib = build()
        self._lib = lib
        self._ops = (_Op * CAPACITY)()
        self._done = (ctypes.c_uint32 * CAPACITY)()
        self._reaped = (ctypes.c_uint32 * CAPACITY)()
        self._r = _Plane(
            worker=worker,
            launch=launch or None,
            record=record or None,
            host_copy=host_copy or None,
            ops=ctypes.addressof(self._ops),
            done=ctypes.addressof(self._done),
            capacity=CAPACITY,
        )
        self._plane = ctypes.byref(self._r)
        lib.kvf_init(self._plane)
        self._worker = worker
        self._sleep = _sleeper()
        self._peeked = (ctypes.c_uint64 * 2)()
        self._free = list(range(CAPACITY - 1, -1, -1))
        self._posted: dict[int, NativeOp] = {}  # op id -> its operation, until reaped

    @property
    def posted(self) -> int:
        return len(self._posted)

    @property
    def free_records(self) -> int:
        return len(self._free)

    @property
    def host_copies(self) -> bool:
        """Whether a receive can copy on the host once its bytes are in."""
        return bool(self._r.host_copy)

    @property
    def completed(self) -> bool:
        """Whether completions wait to be reaped (one can run inside a post, with no event on
        the worker's descriptor to say so)."""
        return self._r.done_count > 0

    @property
    def sleep_events(self) -> int:
        """The worker's events `sleep` took without handing the thread back to Python."""
        return self._r.sleep_events

    @property
    def sleep_ucx_s(self) -> float:
        """Thread CPU `sleep` spent inside UCX's progress and arm."""
        return self._r.sleep_ucx_ns * 1e-9

    def sleep(self, watched, timeout_ms: int, messages: bool, every_event: bool) -> int:
        """kvf_sleep, the GIL released: WOKE_DATA, WOKE_FDS (one of `watched[1:]`, a PollFd
        array after the worker's descriptor, turned readable: its `revents` say which) or
        WOKE_TIMER (ucx_native.c says when)."""
        woke = self._sleep(self._plane, watched, len(watched), timeout_ms, messages, every_event)
        if woke < 0:
            raise OSError(-woke, f"the transfer thread's sleep failed: {os.strerror(-woke)}")
        return woke

    def peek(self) -> tuple[int, int] | None:
        """(tag, length) of the oldest message waiting to be taken, or None."""
        if not self._lib.kvf_peek(self._worker, self._peeked):
            return None
        return self._peeked[0], self._peeked[1]

    def record(self) -> tuple[int, Launch] | None:
        """A free record to fill (its id and its Launch, cleared), or None if every record is
        in flight."""
        if not self._free:
            return None
        op_id = self._free[-1]
        launch = self._ops[op_id].launch
        launch.function, launch.host = None, 0
        return op_id, launch

    def post(self, op_id: int, tag: int, buffer, nbytes: int) -> NativeOp | None:
        """Take the message tagged `tag` into `buffer` (nbytes at its data_ptr()) with record
        `op_id` (from `record`); None if no such message waits. Raises on a UCX error."""
        status = self._lib.kvf_post(self._plane, op_id, tag, buffer.data_ptr(), nbytes)
        if status == _NO_MESSAGE:
            return None
        return self._started(op_id, status, "receive", buffer)

    def expect(self, op_id: int, tag: int, buffer, nbytes: int) -> NativeOp:
        """Post, ahead of its message, the receive of the message tagged `tag` into `buffer`
        (at most nbytes at its data_ptr()) with record `op_id`: UCX takes the message in as it
        arrives. Raises on a UCX error."""
        status = self._lib.kvf_expect(self._plane, op_id, tag, buffer.data_ptr(), nbytes)
        return self._started(op_id, status, "receive", buffer)

    def cancel(self, op: NativeOp) -> None:
        """Cancel `op` if it is still in flight (a receive posted ahead whose message has not
        begun to arrive then completes, cancelled, in a later progress)."""
        if not op.finished:
            self._lib.kvf_cancel(self._plane, op.op_id)

    def send(self, op_id: int, endpoint: int, tag: int, buffer, nbytes: int) -> NativeOp:
        """Send `buffer` (nbytes at its data_ptr()) tagged `tag` over `endpoint` (a ucp_ep_h)
        with record `op_id`. Raises on a UCX error."""
        status = self._lib.kvf_send(self._plane, op_id, endpoint, tag, buffer.data_ptr(), nbytes)
        return self._started(op_id, status, "send", buffer)

    def _started(self, op_id: int, status: int, kind: str, buffer) -> NativeOp:
        if status != _POSTED_OK:
            raise RuntimeError(f"posting a UCX {kind} failed: {self.status_name(status)}")
        self._free.pop()
        op = self._posted[op_id] = NativeOp(self, kind, buffer, op_id)
        return op

    def reap(self) -> int:
        """Mark the operations whose completion ran (in a progress since the last reap) done;
        how many."""
        count = self._lib.kvf_reap(self._plane, self._reaped, CAPACITY)
        for i in range(count):
            op_id = self._reaped[i]
            record = self._ops[op_id]
            op = self._posted.pop(op_id)
            op.status, op.launch_status = record.status, record.launch_status
            op.launched = bool(record.launched)
            staged = record.launch.function or record.launch.host
            if staged and record.status == UCS_OK and not op.launched:
                op.short = (record.length, record.launch.expected)  # its copy was not launched
            op.finished = True
            op._buffer = None
            self._free.append(op_id)
        return count

    def cancel_all(self) -> None:
        """Cancel every operation in flight: each completes, cancelled (or done, had it
        finished), in a later progress; one UCX cannot cancel ends when its peer does."""
        self._lib.kvf_cancel_all(self._plane)

    def close(self) -> None:
        """After `cancel_all`, a progress and a `reap`: an operation UCX still holds keeps the
        records it writes into alive for the rest of the process."""
        if self._posted:
            _ORPHANED.append((self._ops, self._done, self._r))

    def status_name(self, status: int) -> str:
        return f"{_ucs_status_string(status)} (UCS status {status})"


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
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    sizes = (lib.kvf_op_size(), lib.kvf_plane_size())
    if sizes != (ctypes.sizeof(_Op), ctypes.sizeof(_Plane)):
        raise NativeUnavailable(
            f"{target} has record sizes {sizes}, this module expects "
            f"{(ctypes.sizeof(_Op), ctypes.sizeof(_Plane))}"
        )
    return lib


@functools.cache
def _sleeper():
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
def _ucs_status_string(status: int) -> str:
    import libucx

    ucs = ctypes.CDLL(str(Path(libucx.__file__).parent / "lib" / "libucs.so"))
    ucs.ucs_status_string.argtypes, ucs.ucs_status_string.restype = (ctypes.c_int,), ctypes.c_char_p
    return (ucs.ucs_status_string(status) or b"unknown").decode()
