"""Emptying a non-blocking descriptor (a wake-up pipe or eventfd) with the GIL held.

`os.read` lets the GIL go around the system call. On a transfer thread that is a turn handed
to the engine's thread whenever it runs Python, and a switch interval waited to get it back
(see cuda_driver.py); reading a descriptor that is known not to block needs no such release.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

_SCRATCH = 4096


@functools.cache
def _read():
    read = ctypes.PyDLL(None, use_errno=True).read  # libc's, already in the process
    read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    read.restype = ctypes.c_ssize_t
    return read, ctypes.create_string_buffer(_SCRATCH)


def drain(fd: int) -> None:
    """Read what `fd` holds (up to 4 KiB: a bell's few bytes, an eventfd's counter) and throw
    it away; nothing waiting is no error. Raises OSError as `os.read` would otherwise."""
    read, scratch = _read()
    if read(fd, scratch, _SCRATCH) < 0:
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise OSError(code, os.strerror(code))
