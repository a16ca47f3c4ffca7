"""Loading UCX: its options set before ucxx is first imported (UCX reads them once per process),
and libucp for the worker calls the transfer thread makes with the GIL held."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from kvferry.transport.netdev import ucx_net_devices

# UCX's tcp transport moves a message in pieces of its segment size (8 KiB to send by default),
# each piece an event the receiving loop wakes for; a data message is a chunk's KV (MiBs).
# Set unless the environment says otherwise (2 MiB: the embedded default's 1.9 MiB messages in
# one piece; docs/benchmarks.md, "Fewer frames and turns per request").
TCP_SEGMENTS = {"UCX_TCP_TX_SEG_SIZE": "2m", "UCX_TCP_RX_SEG_SIZE": "2m"}
# A rendezvous from GPU memory over cuda_ipc is a write by the sender ("flushed write to
# remote": a round trip back to the sender, whose worker its transfer thread must progress, and
# a copy on its stream, beside its forwards) unless UCX may read the bytes from the receiver
# (get), which it allows only between GPUs joined by NVLink. On a host of one GPU both sides are
# that GPU, and a get is a copy the receiver starts as it matches the message: set there unless
# the environment says otherwise (one H100 at c=32: the sends posted -> the room's KV ready at
# decode 1.0 ms against 4.4; docs/benchmarks.md, "Receivers that pull").
ONE_GPU = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


def defaults(host_gpus: int) -> dict[str, str]:
    """The UCX options set unless the environment sets them, on a host of `host_gpus` GPUs."""
    options = {"UCX_WARN_UNUSED_ENV_VARS": "n", **TCP_SEGMENTS}
    if host_gpus == 1:
        options.update(ONE_GPU)
    return options


def load_ucxx(
    tls: str | None = None, host: str | None = None, ports: str | None = None, gpu: bool = False
):
    """The ucxx low-level API, importing it with UCX_TLS=`tls` if given, with UCX's network
    transports kept to the interface of `host` unless UCX_NET_DEVICES is set, and its tcp
    transport's ports in `ports` ("LOW-HIGH", UCX_TCP_PORT_RANGE) if given, and `defaults` for
    this host (`gpu`: the caller's memory is on a GPU) unless set. Only the first call's
    arguments count: UCX never rereads them."""
    if "ucxx" not in sys.modules:
        if tls:
            os.environ["UCX_TLS"] = tls
        if ports:
            os.environ["UCX_TCP_PORT_RANGE"] = ports
        devices = ucx_net_devices(host) if "UCX_NET_DEVICES" not in os.environ else None
        if devices:
            os.environ["UCX_NET_DEVICES"] = devices
        for name, value in defaults(host_gpus() if gpu else 0).items():
            os.environ.setdefault(name, value)
    elif tls and os.environ.get("UCX_TLS") != tls:
        raise RuntimeError(
            f"UCX is already loaded with UCX_TLS={os.environ.get('UCX_TLS')!r}; "
            f"ucx_tls={tls!r} must be set before the first transfer agent starts"
        )
    import ucxx._lib.libucxx as ucx_api

    return ucx_api


@functools.cache
def ucp():
    """libucp (the one ucxx loaded), whose worker calls below are made with the GIL held:
    ucp_worker_arm (status) and ucp_worker_progress (whether it progressed anything)."""
    import libucx  # the UCX wheel ucxx loads

    libucx.load_library()
    ucp = ctypes.PyDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so"))
    ucp.ucp_worker_arm.argtypes, ucp.ucp_worker_arm.restype = (ctypes.c_void_p,), ctypes.c_int
    progress = ucp.ucp_worker_progress
    progress.argtypes, progress.restype = (ctypes.c_void_p,), ctypes.c_uint
    return ucp


def host_gpus() -> int:
    """The GPUs of this host as NVML counts them (whatever CUDA_VISIBLE_DEVICES shows this
    process); 0 where NVML cannot say."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        count = ctypes.c_uint(0)
        if nvml.nvmlInit_v2() != 0:
            return 0
        try:
            return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
        finally:
            nvml.nvmlShutdown()
    except (OSError, AttributeError):
        return 0
