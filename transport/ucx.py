"""UCX data plane over ucxx: one worker per rank, progressed by the rank's transfer thread.

No progress thread: the worker runs in blocking progress mode, owned by the rank's transfer
thread, which sleeps on its event descriptor beside the control sockets (natively, without the
GIL, taking the worker's events itself: `sleep`; in the loop's poller where there is no native
path) and progresses the worker when it fires. One thread owns the worker, so no lock is taken
and no second thread holds the GIL for completions.

UCX reads its options when ucxx is first imported, so `load_ucxx` (transport/ucx_load.py) sets
them (from the transfer config) before that import and refuses to change them afterwards.

Data messages are probed, sent and received through native code (transport/native.py) by
default: a receive's completion callback launches its scatter (on a GPU; in host memory it
copies it) inside the progress call, and one call per turn takes every completion. ucxx's own
API is the path where that cannot be built (no C compiler), with `transfer.native_ucx: false`,
and for discards.

Peer addresses come off the wire: each is parsed by transport/ucx_address.py before UCX sees
it, since UCX's own unpacker aborts the process on malformed input.
"""

from __future__ import annotations

import ctypes
import logging
import math
import select
import time
from collections.abc import Callable

import numpy as np

from kvferry.staging import host_copy
from kvferry.staging.native_build import NativeUnavailable
from kvferry.transport.dataplane import DataOp, DataPlane, DoneOp, InvalidAddress
from kvferry.transport.native import CAPACITY, WOKE_DATA, WOKE_FDS, WOKE_TIMER, NativeOp, NativeOps
from kvferry.transport.native_lib import PollFd
from kvferry.transport.ucx_address import check_peer_address, parse_worker_address
from kvferry.transport.ucx_load import load_ucxx, ucp
from kvferry.transport.ucxx_ops import UcxOp, array_of

log = logging.getLogger(__name__)
DISCARD_BYTES = 256  # scratch a discarded message is truncated into
_WOKE = {WOKE_DATA: "data", WOKE_FDS: "fds", WOKE_TIMER: "timer"}  # NativeOps.sleep's answers
FULL_PROGRESS_EVERY_S = 1.0  # ucxx's own progress (request cancelling included) at least this often
UCS_OK, UCS_ERR_BUSY = 0, -15  # ucs/type/status.h


def _own_address(address: bytes):
    """Our worker address, parsed: peers' addresses are checked against its layout."""
    try:
        return parse_worker_address(address)
    except InvalidAddress as exc:
        raise RuntimeError(
            f"cannot check peer UCX addresses in this UCX configuration (unified mode?): {exc}"
        ) from exc


class UcxDataPlane(DataPlane):
    """`cuda_device`: the GPU whose memory will be sent or received, if any; UCX needs its
    context current on the thread that drives transfers (`on_loop_start`).
    `host`: the interface the transport binds to (TransferConfig.host); UCX listens there only."""

    def __init__(
        self,
        tls: str | None = None,
        cuda_device: int | None = None,
        host: str | None = None,
        ports: str | None = None,
        native: bool = True,
    ) -> None:
        """`ports`: "LOW-HIGH", the TCP ports of UCX's tcp transport (TransferConfig.ucx_ports).
        `native`: probe, send and receive through transport/native.py
        (TransferConfig.native_ucx), which on a GPU launches each scatter from its receive's
        completion; ucxx's API if it cannot be built here (logged)."""
        super().__init__()
        self._ucx = load_ucxx(tls, host, ports, gpu=cuda_device is not None)
        self._cuda_device = cuda_device
        self.on_loop_start()  # the creating thread too: UCX sets up its CUDA transports here
        self._context = self._ucx.UCXContext(
            feature_flags=(self._ucx.Feature.TAG, self._ucx.Feature.WAKEUP)
        )
        self._worker = self._ucx.UCXWorker(self._context)
        self._worker.init_blocking_progress_mode()
        self._handle = self._worker.handle  # the ucp_worker_h
        self._cancels_due = False  # an endpoint closed: progress through ucxx next time
        self._next_full_progress = 0.0
        self._address = self._worker.address.tobytes()
        self._local = _own_address(self._address)
        self._match_all = (self._ucx.UCXXTag(0), self._ucx.UCXXTagMask(0))
        self._scratch = np.empty(DISCARD_BYTES, dtype=np.uint8)
        self._native = self._native_ucx() if native else None
        self._ucxx_ops: list[UcxOp] = []  # through ucxx's API, not yet seen done
        self._sleep_fds: tuple = (None, None)  # the owner's descriptors, and as a C array

    def _native_ucx(self) -> NativeOps | None:
        try:
            if self._cuda_device is None:  # a cache in host memory: scattered by host_copy.c
                copies = host_copy.library()
                address = ctypes.cast(copies.kvf_host_copy, ctypes.c_void_p).value if copies else 0
                return NativeOps(self._handle, host_copy=address)
            from kvferry.staging import cuda_driver

            launch, record = cuda_driver.entry_points("cuLaunchKernel", "cuEventRecord")
            return NativeOps(self._handle, launch, record)
        except NativeUnavailable as exc:
            log.warning("data messages go through ucxx's API: the native path is unavailable: "
                        "%s", exc)  # fmt: skip
            return None

    @property
    def native(self) -> bool:
        """Whether sends and receives go through the native path."""
        return self._native is not None

    @property
    def chains_copies(self) -> bool:
        native = self._native
        return native is not None and (self._cuda_device is not None or native.host_copies)

    @property
    def address(self) -> bytes:
        return self._address

    @property
    def wake_fd(self) -> int:
        return self._worker.epoll_file_descriptor

    def register_staging(self, address: int, length: int, device: bool) -> None:
        if self._native is not None:
            self._native.register(self._context.handle, address, length, device)

    @property
    def sleeps(self) -> bool:
        return self._native is not None

    @property
    def sleep_events(self) -> int:
        return 0 if self._native is None else self._native.sleep_events

    def sleep(self, fds: tuple[int, ...], timeout_s: float, messages: bool):
        # operations through ucxx, or endpoints that closed, are for Python's progress to see
        native = self._native
        if fds is not self._sleep_fds[0]:  # the owner's descriptors changed
            every = (self.wake_fd, *fds)
            watched = (PollFd * len(every))(*((fd, select.POLLIN, 0) for fd in every))
            self._sleep_fds = (fds, watched)
        watched = self._sleep_fds[1]
        every_event = bool(self._ucxx_ops) or self._cancels_due
        before = native.sleep_ucx_s
        woke = native.sleep(watched, math.ceil(timeout_s * 1000), messages, every_event)
        ready = () if woke != WOKE_FDS else tuple(w.fd for w in watched[1:] if w.revents)
        return _WOKE[woke], ready, native.sleep_ucx_s - before

    def on_loop_start(self) -> None:
        if self._cuda_device is not None:
            from ucxx._cuda_context import ensure_cuda_context

            ensure_cuda_context(self._cuda_device)

    def _progress(self) -> None:
        # ucxx's progress() is ucp_worker_progress until it reports nothing, then the
        # cancelling of requests left on endpoints that closed (ucxx Worker::progress). The
        # first part runs here with the GIL held, as arm() does; ucxx's own call runs after an
        # endpoint closed or broke, and once a second in any case.
        now = time.monotonic()
        self.quiet = False
        if self._ucxx_ops:  # through ucxx: its requests complete in its callbacks
            self._ucxx_ops = [op for op in self._ucxx_ops if not op.done()]
        if self._cancels_due or now >= self._next_full_progress:
            self._cancels_due = False
            self._next_full_progress = now + FULL_PROGRESS_EVERY_S
            self._worker.progress()
            if self._native is not None:
                self._native.reap()
            return
        progress, handle = ucp().ucp_worker_progress, self._handle
        while progress(handle):
            pass
        if self._native is None:
            return
        # quiet: no native operation completed, none through ucxx is left to complete, and
        # no message waits to be probed
        self.quiet = not self._native.reap() and not self._ucxx_ops and self._native.peek() is None

    def close(self) -> None:
        super().close()
        if self._native is not None:  # what is still in flight ends, cancelled
            self._native.cancel_all()
        self._worker.progress()  # the endpoints' closing, with the loop thread gone
        if self._native is not None:
            self._native.reap()
            self._native.close()

    def arm(self) -> bool:
        # ucp_worker_arm itself, as ucxx's arm() calls it, but with the GIL held (PyDLL): the
        # call never blocks, and letting the GIL go around it hands the loop's turn to any
        # other thread of the process running Python (an engine's forward)
        if self._native is not None and self._native.completed:
            return False  # completions that ran inside a post: no event will tell of them
        status = ucp().ucp_worker_arm(self._handle)
        if status == UCS_ERR_BUSY:
            return False
        if status != UCS_OK:
            raise RuntimeError(f"ucp_worker_arm failed with UCS status {status}")
        return True

    def _connect(self, address: bytes, on_error: Callable[[str], None]):
        check_peer_address(address, self._local)
        try:
            peer = self._ucx.UCXAddress.create_from_buffer(address)
            endpoint = self._worker.create_endpoint_from_worker_address(peer, True)
        except self._ucx.UCXError as exc:  # e.g. no transport reaches the peer
            raise InvalidAddress(f"UCX cannot connect to the peer: {exc}") from exc
        # Called inside progress(), on the loop thread; on_error posts the news for after it.
        endpoint.set_close_callback(
            lambda *args: self._closed("UCX endpoint to the peer closed", on_error)
        )
        return endpoint

    def _closed(self, why: str, on_error: Callable[[str], None]) -> None:
        self._cancels_due = True  # ucxx cancels what was left on it in its own progress()
        on_error(why)

    def _disconnect(self, endpoint) -> None:
        endpoint.remove_close_callback()
        endpoint.close()
        self._cancels_due = True

    def _send(self, endpoint, buffer, tag, group) -> DataOp:
        op_id = self._record(None)
        if op_id is None:  # through ucxx (or every native record is in flight)
            array = array_of(buffer)
            return self._ucxx_op(endpoint.tag_send(array, self._ucx.UCXXTag(tag)), array)
        nbytes = buffer.numel() * buffer.element_size()
        return self._native.send(op_id, endpoint.handle, tag, buffer, nbytes, group)

    def _probe(self):
        if self._native is not None:
            return self._native.peek()
        tag, mask = self._match_all
        probe = self._worker.tag_probe(tag, mask, remove=False)
        return (probe.sender_tag.value, int(probe.length)) if probe.matched else None

    def _take(self, tag: int, array) -> DataOp:
        probe = self._worker.tag_probe(self._ucx.UCXXTag(tag), remove=True)
        if not probe.matched:
            return DoneOp(f"no message with tag {tag:#x}")
        return self._ucxx_op(self._worker.tag_recv_with_handle(array, probe), array)

    def _ucxx_op(self, request, array) -> UcxOp:
        op = UcxOp(request, array)
        self._ucxx_ops.append(op)  # until a progress finds it done
        return op

    def _record(self, then, spare: int = 0) -> int | None:
        """A native record, `then` handed its launch; None (through ucxx, or nothing at all)
        where there is no native path or `spare` records or fewer are free."""
        if self._native is None or self._native.free_records <= spare:
            return None
        op_id, launch = self._native.record()
        if then is not None:
            then(launch)
        return op_id

    def _recv(self, tag, buffer, then) -> DataOp:
        op_id = self._record(then)
        if op_id is None:  # through ucxx (or every native record is in flight)
            return self._take(tag, array_of(buffer))
        op = self._native.post(op_id, tag, buffer, buffer.numel() * buffer.element_size())
        return DoneOp(f"no message with tag {tag:#x}") if op is None else op

    @property
    def posts_ahead(self) -> bool:
        return self._native is not None

    def _expect(self, tag, buffer, then, group) -> DataOp | None:
        # receives posted ahead may wait long for their messages: half the records are left to
        # messages that are here (None: this one comes by probe)
        op_id = self._record(then, spare=CAPACITY // 2)
        nbytes = buffer.numel() * buffer.element_size()
        return None if op_id is None else self._native.expect(op_id, tag, buffer, nbytes, group)

    def open_group(self):
        return None if self._native is None else self._native.open_group()

    def close_group(self, group) -> None:
        self._native.close_group(group)

    def all_loud(self, on: bool) -> None:
        if self._native is not None:
            self._native.all_loud(on)

    def cancel(self, op) -> None:
        if self._native is not None and isinstance(op, NativeOp):
            self._native.cancel(op)
            self.posted = True  # its completion comes in the next progress

    def _discard(self, tag) -> DataOp:
        from ucxx._lib.arr import Array

        return self._take(tag, Array(self._scratch))
