"""Sends and receives through ucxx's own API (where the native path is not built, past its
records, and for discards): a tensor's bytes as a ucxx Array, and the operation that wraps a
ucxx request."""

from __future__ import annotations

import torch

from kvferry.transport.dataplane import DataOp, data_failure
from kvferry.transport.failure import Failure


def array_of(buffer: torch.Tensor):
    """`buffer`'s bytes as a ucxx Array (a device tensor's through its CUDA array interface)."""
    from ucxx._lib.arr import Array

    if buffer.device.type == "cuda":
        return Array(_DeviceBytes(buffer))
    return Array(buffer.view(torch.uint8).view(-1).numpy())


class _DeviceBytes:
    """A contiguous device tensor's bytes as the CUDA array interface describes them, which is
    what ucxx's Array reads: a tensor's own `__cuda_array_interface__` is a Python property
    that checks and converts on every read, and a data message is on every read's path."""

    __slots__ = ("__cuda_array_interface__", "_owner")

    def __init__(self, buffer: torch.Tensor) -> None:
        self._owner = buffer  # the memory lives as long as the receive or send holds this
        self.__cuda_array_interface__ = {
            "data": (buffer.data_ptr(), False),
            "shape": (buffer.numel() * buffer.element_size(),),
            "typestr": "|u1",
            "strides": None,
            "version": 2,
        }


# ucxx errors that mean the peer's process or connection is gone, not that this message was bad
PEER_GONE = frozenset(
    {"UCXXConnectionResetError", "UCXXUnreachableError", "UCXXEndpointTimeoutError"}
)


class UcxOp(DataOp):
    __slots__ = ("_buffer", "_request")

    def __init__(self, request, buffer) -> None:
        self._request = request
        self._buffer = buffer  # keeps the memory alive until UCX is done with it

    def done(self) -> bool:
        return self._request.completed

    def error(self) -> Failure | None:
        try:
            self._request.check_error()
        except Exception as exc:  # ucxx raises its own typed errors; the reason is what we keep
            reason = f"{type(exc).__name__}: {exc}"
            return data_failure(reason, peer_gone=type(exc).__name__ in PEER_GONE)
        return None
