"""Device memory from the CUDA virtual-memory API (cuMemCreate), for fabric-handle transports.

Opt-in: plain cudaMalloc memory suits UCX cuda_ipc; a VMM allocation carries a shareable handle
(fabric where the platform has one, else a POSIX file descriptor) for multi-node NVLink.
Driven through ctypes so no extra package is needed.
"""

from __future__ import annotations

import ctypes

import torch

_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_HANDLE_POSIX_FD = 0x1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_HANDLE_FABRIC = 0x8  # CU_MEM_HANDLE_TYPE_FABRIC
_GRANULARITY_RECOMMENDED = 1  # CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
_ACCESS_READWRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class VMMError(RuntimeError):
    pass


def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, call: str) -> None:
    if result != 0:
        raise VMMError(f"{call} failed with CUresult {result}")


class VMMAllocation:
    """`nbytes` (rounded up to the granularity) of device memory mapped at one address."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        torch.empty(1, device=device)  # makes the device's primary context current
        self._cu = _driver()
        self.device = device
        self._handle = ctypes.c_ulonglong()
        self.handle_type = self._create(nbytes)
        self.address = ctypes.c_ulonglong()
        _check(
            self._cu.cuMemAddressReserve(
                ctypes.byref(self.address),
                ctypes.c_size_t(self.size),
                ctypes.c_size_t(0),
                ctypes.c_ulonglong(0),
                ctypes.c_ulonglong(0),
            ),
            "cuMemAddressReserve",
        )
        _check(
            self._cu.cuMemMap(
                self.address,
                ctypes.c_size_t(self.size),
                ctypes.c_size_t(0),
                self._handle,
                ctypes.c_ulonglong(0),
            ),
            "cuMemMap",
        )
        access = _AccessDesc(_Location(_LOCATION_DEVICE, device.index or 0), _ACCESS_READWRITE)
        _check(
            self._cu.cuMemSetAccess(
                self.address, ctypes.c_size_t(self.size), ctypes.byref(access), ctypes.c_size_t(1)
            ),
            "cuMemSetAccess",
        )
        self.nbytes = nbytes

    def _create(self, nbytes: int) -> int:
        """cuMemCreate with a fabric handle if the platform allows one, else a POSIX fd."""
        for handle_type in (_HANDLE_FABRIC, _HANDLE_POSIX_FD):
            prop = _AllocationProp(
                _PINNED, handle_type, _Location(_LOCATION_DEVICE, self.device.index or 0)
            )
            granularity = ctypes.c_size_t()
            _check(
                self._cu.cuMemGetAllocationGranularity(
                    ctypes.byref(granularity), ctypes.byref(prop), _GRANULARITY_RECOMMENDED
                ),
                "cuMemGetAllocationGranularity",
            )
            self.size = -(-nbytes // granularity.value) * granularity.value
            if (
                self._cu.cuMemCreate(
                    ctypes.byref(self._handle),
                    ctypes.c_size_t(self.size),
                    ctypes.byref(prop),
                    ctypes.c_ulonglong(0),
                )
                == 0
            ):
                return handle_type
        raise VMMError(f"cuMemCreate of {self.size} bytes failed for fabric and POSIX fd handles")

    def as_tensor(self) -> torch.Tensor:
        """A uint8 tensor over the first `nbytes` bytes; keeps this allocation alive."""
        return torch.as_tensor(_CudaArray(self), device=self.device)

    def close(self) -> None:
        if self.address.value:
            self._cu.cuMemUnmap(self.address, ctypes.c_size_t(self.size))
            self._cu.cuMemAddressFree(self.address, ctypes.c_size_t(self.size))
            self._cu.cuMemRelease(self._handle)
            self.address = ctypes.c_ulonglong(0)


class _CudaArray:
    """Just enough of __cuda_array_interface__ for torch.as_tensor to wrap the mapping."""

    def __init__(self, allocation: VMMAllocation) -> None:
        self.allocation = allocation  # held by the tensor: the mapping outlives every view
        self.__cuda_array_interface__ = {
            "shape": (allocation.nbytes,),
            "typestr": "|u1",
            "data": (allocation.address.value, False),
            "version": 3,
            "stream": None,
        }
