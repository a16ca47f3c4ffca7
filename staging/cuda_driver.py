"""The few CUDA driver calls a data message's copies make, called with the GIL held.

A transfer thread shares its process with a rank's engine, whose forward is host-bound Python.
torch's and cupy's bindings release the GIL around every call, however short; the engine then
takes it, and the transfer thread waits a whole switch interval to get it back. A gather or
scatter made five such calls (a staging view, the index upload, the launch, the event, the
wake), so each hop of a transfer could wait a millisecond behind a forward. Called through
`ctypes.PyDLL`, which keeps the GIL, the calls below cost a microsecond or two each and never
hand the thread's turn away. Each of them only queues work or reads a status: none blocks.

Importing it needs no GPU: the driver library is loaded at the first call.
"""

from __future__ import annotations

import ctypes
import functools
import threading

CU_EVENT_DISABLE_TIMING = 0x2
CUDA_ERROR_NOT_READY = 600

_c = ctypes
_ptr, _uint, _size = _c.c_void_p, _c.c_uint, _c.c_size_t
_SIGNATURES = {
    "cuLaunchKernel": (_ptr, _uint, _uint, _uint, _uint, _uint, _uint, _uint, _ptr, _ptr, _ptr),
    "cuEventCreate": (_c.POINTER(_ptr), _uint),
    "cuEventDestroy_v2": (_ptr,),
    "cuEventRecord": (_ptr, _ptr),
    "cuEventQuery": (_ptr,),
    "cuStreamWaitEvent": (_ptr, _ptr, _uint),
    "cuMemcpyHtoDAsync_v2": (_c.c_uint64, _ptr, _size, _ptr),
    "cuLaunchHostFunc": (_ptr, _ptr, _ptr),
    "cuCtxGetCurrent": (_c.POINTER(_ptr),),
    "cuCtxGetDevice": (_c.POINTER(_c.c_int),),
    "cuDeviceGet": (_c.POINTER(_c.c_int), _c.c_int),
    "cuDevicePrimaryCtxRetain": (_c.POINTER(_ptr), _c.c_int),
    "cuCtxSetCurrent": (_ptr,),
    "cuGetErrorName": (_c.c_int, _c.POINTER(_c.c_char_p)),
}


class CudaError(RuntimeError):
    pass


@functools.cache
def _lib():
    lib = ctypes.PyDLL("libcuda.so.1")  # PyDLL: the GIL stays held during every call
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


@functools.cache
def _blocking():
    lib = ctypes.CDLL("libcuda.so.1")  # CDLL: the GIL is released while a call waits
    lib.cuEventSynchronize.argtypes, lib.cuEventSynchronize.restype = (_ptr,), ctypes.c_int
    return lib


def _check(status: int, call: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        _lib().cuGetErrorName(status, ctypes.byref(name))
        label = name.value.decode() if name.value else "unknown"
        raise CudaError(f"{call} failed with CUDA error {status} ({label})")


_thread = threading.local()


def use_device(index: int) -> None:
    """Make device `index`'s primary context (the one torch and cupy use) current on this
    thread unless a context of that device is: driver calls act on the thread's current
    context. Cheap after the first call on a thread."""
    if getattr(_thread, "device", None) == index:
        return
    lib, context, device = _lib(), ctypes.c_void_p(), ctypes.c_int(-1)
    _check(lib.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    if context.value:
        _check(lib.cuCtxGetDevice(ctypes.byref(device)), "cuCtxGetDevice")
    if device.value != index:
        _check(lib.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
        retain = lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
        _check(retain, "cuDevicePrimaryCtxRetain")
        _check(lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    _thread.device = index


def entry_points(*names: str) -> tuple[int, ...]:
    """The addresses of driver functions, for native code that calls them (with the same
    signatures as above)."""
    return tuple(ctypes.cast(getattr(_lib(), name), ctypes.c_void_p).value for name in names)


def launch_kernel(function: int, grid: tuple[int, int], block: int, stream: int, params) -> None:
    """cuLaunchKernel of `function` over grid (x, y) with `params` (the address of its array of
    argument pointers)."""
    status = _lib().cuLaunchKernel(
        function, grid[0], grid[1], 1, block, 1, 1, 0, stream, params, None
    )
    _check(status, "cuLaunchKernel")


def copy_to_device(device_address: int, host_address: int, nbytes: int, stream: int) -> None:
    """Queue a copy from pinned host memory to the device on `stream`."""
    status = _lib().cuMemcpyHtoDAsync_v2(device_address, host_address, nbytes, stream)
    _check(status, "cuMemcpyHtoDAsync")


def launch_host_function(stream: int, function: int, argument: int) -> None:
    """Queue a native `function(argument)` to run once the work queued before it is done."""
    _check(_lib().cuLaunchHostFunc(stream, function, argument), "cuLaunchHostFunc")


def wait_event(stream: int, event: int) -> None:
    """Work queued on `stream` after this waits for `event`'s recorded work."""
    _check(_lib().cuStreamWaitEvent(stream, event, 0), "cuStreamWaitEvent")


def query_event(event: int) -> bool:
    """Whether the work recorded in `event` is done (an event never recorded is)."""
    status = _lib().cuEventQuery(event)
    if status == CUDA_ERROR_NOT_READY:
        return False
    _check(status, "cuEventQuery")
    return True


class Event:
    """A CUDA event without timing, by raw handle, recorded and queried with the GIL held.
    Creating one costs more than recording it again: owners keep them in pools."""

    __slots__ = ("handle",)

    def __init__(self) -> None:
        handle = ctypes.c_void_p()
        _check(_lib().cuEventCreate(ctypes.byref(handle), CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        self.handle = handle.value

    def record(self, stream: int) -> None:
        _check(_lib().cuEventRecord(self.handle, stream), "cuEventRecord")

    def query(self) -> bool:
        return query_event(self.handle)

    def synchronize(self) -> None:
        """Block until the recorded work is done; the only call here that waits, so the only
        one that lets the GIL go meanwhile."""
        synchronize_event(self.handle)

    def destroy(self) -> None:
        """Release the event (the driver frees it once recorded work is done)."""
        if self.handle:
            _check(_lib().cuEventDestroy_v2(self.handle), "cuEventDestroy")
            self.handle = None


def synchronize_event(event: int) -> None:
    """Block until the work recorded by `event` (a raw CUevent) is done, the GIL let go."""
    _check(_blocking().cuEventSynchronize(event), "cuEventSynchronize")


def handle_of(event) -> int:
    """The raw CUevent of a driver `Event` or a torch.cuda.Event (0: never recorded)."""
    handle = event.handle if isinstance(event, Event) else event.cuda_event
    return handle or 0
