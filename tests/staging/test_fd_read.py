import os
import select

import pytest

from kvferry.staging import fd_read


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_drain_empties_a_pipe_and_an_eventfd_and_finds_nothing_quietly():
    read, write = os.pipe()
    os.set_blocking(read, False)
    signal = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.write(write, b"xyz")
        os.eventfd_write(signal, 5)
        assert readable(read) and readable(signal)
        fd_read.drain(read)
        fd_read.drain(signal)
        assert not readable(read) and not readable(signal)
        fd_read.drain(read)  # nothing waiting: no error
        fd_read.drain(signal)
    finally:
        for fd in (read, write, signal):
            os.close(fd)


def test_drain_of_a_closed_descriptor_raises_as_os_read_does():
    read, write = os.pipe()
    os.close(read)
    os.close(write)
    with pytest.raises(OSError) as info:
        fd_read.drain(read)
    assert info.value.errno == 9  # EBADF
