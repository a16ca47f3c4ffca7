"""Native sends and receives for the UCX data plane (ucx_native.c): a probe, a receive whose
completion callback launches the message's scatter with no Python in between, a send, one
call per turn that takes every completion, and the transfer thread's sleep, which takes the
worker's events without the GIL.

The C library is built at first use (transport/native_lib.py); where it cannot be, the data
plane sends and receives through ucxx's API instead, and says so in its log.
"""

from __future__ import annotations

import ctypes
import os

from kvferry.transport.dataplane import DataOp, data_failure
from kvferry.transport.failure import Failure
from kvferry.transport.native_lib import Launch, Op, Plane, build, sleeper, status_string

CAPACITY = 4096  # operations in flight at once; past this one goes through ucxx
_POSTED_OK, _NO_MESSAGE = 0, 1
WOKE_TIMER, WOKE_DATA, WOKE_FDS = 0, 1, 2  # why `NativeOps.sleep` returned
UCS_OK = 0
UCS_ERR_CANCELED = -16
# UCS statuses that mean the peer's process or link went away (ucs/type/status.h)
_PEER_GONE = frozenset({-6, -25, -80})  # UNREACHABLE, CONNECTION_RESET, ENDPOINT_TIMEOUT
_ORPHANED: list = []  # records of closed planes that UCX may still complete into


class NativeOp(DataOp):
    """A send or receive posted by NativeOps; done once a progress has reaped it."""

    __slots__ = (
        "_buffer", "_ops", "finished", "finished_at", "group", "kind", "launch_status",
        "launched", "length", "op_id", "short", "status",
    )  # fmt: skip

    def __init__(self, ops: NativeOps, kind: str, buffer, op_id: int, group: int | None) -> None:
        self._ops, self.kind, self.op_id, self.group = ops, kind, op_id, group
        self._buffer = buffer  # the memory stays alive while UCX may touch it
        self.finished = False
        self.finished_at: float | None = None  # wall clock of its completion (time.time())
        self.length: int | None = None  # bytes received
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
    answers None and the caller goes through ucxx. A room's operations (its receives posted
    ahead, its sends) can form a group (`open_group`), whose completions but the last (or a
    failed one) end no sleep (ucx_native.c).

    `launch`, `record`: addresses of the CUDA driver's cuLaunchKernel and cuEventRecord, for
    receives that launch a copy on completion (0 on a host without CUDA); `host_copy`: that of
    staging/host_copy.c's kvf_host_copy, for receives that copy on the host (0: none)."""

    def __init__(self, worker: int, launch: int = 0, record: int = 0, host_copy: int = 0) -> None:
        lib = build()
        self._lib = lib
        self._ops = (Op * CAPACITY)()
        self._done = (ctypes.c_uint32 * CAPACITY)()
        self._reaped = (ctypes.c_uint32 * CAPACITY)()
        self._groups = (ctypes.c_uint32 * CAPACITY)()
        self._r = Plane(
            worker=worker,
            launch=launch or None,
            record=record or None,
            host_copy=host_copy or None,
            ops=ctypes.addressof(self._ops),
            done=ctypes.addressof(self._done),
            capacity=CAPACITY,
            groups=ctypes.addressof(self._groups),
        )
        self._plane = ctypes.byref(self._r)
        lib.kvf_init(self._plane)
        self._worker = worker
        self._sleep = sleeper()
        self._peeked = (ctypes.c_uint64 * 2)()
        self._free = list(range(CAPACITY - 1, -1, -1))
        self._posted: dict[int, NativeOp] = {}  # op id -> its operation, until reaped
        self._free_groups = list(range(CAPACITY - 1, -1, -1))
        # group -> its operations posted and not yet reaped; absent once closed and all reaped
        self._group_ops: dict[int, int] = {}
        self._open_groups: set[int] = set()

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
        """Whether completions that call for a turn wait to be reaped (one can run inside a
        post, with no event on the worker's descriptor to say so); a group's quiet ones do not."""
        return self._r.loud_count > 0

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

    def register(self, context: int, address: int, length: int, device: bool) -> None:
        """Register [address, +length) (the staging ring, device or host memory) with UCX
        once, for the operations posted into it; raises on a UCX error."""
        status = self._lib.kvf_register(self._plane, context, address, length, int(device))
        if status:
            raise RuntimeError(f"registering the staging ring failed: {self.status_name(status)}")

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
        record = self._ops[op_id]
        record.group = 0
        launch = record.launch
        launch.function, launch.host = None, 0
        return op_id, launch

    def open_group(self) -> int | None:
        """A group for operations about to be posted (`expect`, `send`), or None if none is
        free: they complete quietly, the last (or a failed one) waking the sleep. Closed by
        `close_group` once they are all posted."""
        if not self._free_groups:
            return None
        group = self._free_groups.pop()
        self._lib.kvf_group_open(self._plane, group)
        self._group_ops[group] = 0
        self._open_groups.add(group)
        return group

    def close_group(self, group: int) -> None:
        """Every operation of `group` is posted (if each completed inside its post already,
        the next sleep does not wait)."""
        self._lib.kvf_group_close(self._plane, group)
        self._open_groups.discard(group)
        self._group_reaped(group, 0)

    def _group_reaped(self, group: int, reaped: int) -> None:
        left = self._group_ops[group] = self._group_ops[group] - reaped
        if left == 0 and group not in self._open_groups:
            del self._group_ops[group]
            self._free_groups.append(group)

    def post(self, op_id: int, tag: int, buffer, nbytes: int) -> NativeOp | None:
        """Take the message tagged `tag` into `buffer` (nbytes at its data_ptr()) with record
        `op_id` (from `record`); None if no such message waits. Raises on a UCX error."""
        status = self._lib.kvf_post(self._plane, op_id, tag, buffer.data_ptr(), nbytes)
        if status == _NO_MESSAGE:
            return None
        return self._started(op_id, status, "receive", buffer)

    def all_loud(self, on: bool) -> None:
        """Every completion ends the sleep while `on` (the owner waits for ring room that
        completions give back), those not yet reaped too; groups are quiet again after."""
        self._lib.kvf_all_loud(self._plane, int(on))

    def expect(
        self, op_id: int, tag: int, buffer, nbytes: int, group: int | None = None
    ) -> NativeOp:
        """Post, ahead of its message, the receive of the message tagged `tag` into `buffer`
        (at most nbytes at its data_ptr()) with record `op_id`, in `group` (from `open_group`)
        if one is given: UCX takes the message in as it arrives. Raises on a UCX error."""
        self._join(op_id, group)
        status = self._lib.kvf_expect(self._plane, op_id, tag, buffer.data_ptr(), nbytes)
        return self._started(op_id, status, "receive", buffer, group)

    def cancel(self, op: NativeOp) -> None:
        """Cancel `op` if it is still in flight (a receive posted ahead whose message has not
        begun to arrive then completes, cancelled, in a later progress)."""
        if not op.finished:
            self._lib.kvf_cancel(self._plane, op.op_id)

    def send(
        self, op_id: int, endpoint: int, tag: int, buffer, nbytes: int, group: int | None = None
    ) -> NativeOp:
        """Send `buffer` (nbytes at its data_ptr()) tagged `tag` over `endpoint` (a ucp_ep_h)
        with record `op_id`, in `group` if one is given. Raises on a UCX error."""
        self._join(op_id, group)
        status = self._lib.kvf_send(self._plane, op_id, endpoint, tag, buffer.data_ptr(), nbytes)
        return self._started(op_id, status, "send", buffer, group)

    def _join(self, op_id: int, group: int | None) -> None:
        if group is not None:  # counted in C as it is posted (it may complete inside the post)
            self._ops[op_id].group = group + 1

    def _started(
        self, op_id: int, status: int, kind: str, buffer, group: int | None = None
    ) -> NativeOp:
        if status != _POSTED_OK:
            raise RuntimeError(f"posting a UCX {kind} failed: {self.status_name(status)}")
        self._free.pop()
        op = self._posted[op_id] = NativeOp(self, kind, buffer, op_id, group)
        if group is not None:
            self._group_ops[group] += 1
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
            op.finished_at, op.length = record.done_ns * 1e-9, record.length
            if op.group is not None:
                self._group_reaped(op.group, 1)
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
        records it writes into, and the ring's registration, for the rest of the process."""
        if self._posted:
            _ORPHANED.append((self._ops, self._done, self._r))
        else:
            self._lib.kvf_deregister(self._plane)

    def status_name(self, status: int) -> str:
        return f"{status_string(status)} (UCS status {status})"
