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


def load_ucxx(tls: str | None = None, host: str | None = None, ports: str | None = None):
    """The ucxx low-level API, importing it with UCX_TLS=`tls` if given, with UCX's network
    transports kept to the interface of `host` unless UCX_NET_DEVICES is set, and its tcp
    transport's ports in `ports` ("LOW-HIGH", UCX_TCP_PORT_RANGE) if given, and its segments
    at TCP_SEGMENTS unless set. Only the first call's `host` and `ports` count: UCX never
    rereads them."""
    if "ucxx" not in sys.modules:
        if tls:
            os.environ["UCX_TLS"] = tls
        if ports:
            os.environ["UCX_TCP_PORT_RANGE"] = ports
        devices = ucx_net_devices(host) if "UCX_NET_DEVICES" not in os.environ else None
        if devices:
            os.environ["UCX_NET_DEVICES"] = devices
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        for name, value in TCP_SEGMENTS.items():
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
