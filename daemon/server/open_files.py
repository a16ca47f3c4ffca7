"""The process's limit on open files, raised to what many connections need.

Each connection is a file descriptor. A soft limit of 1,024 (a common default) stops a server,
or a client, near a thousand connections with EMFILE; the hard limit is usually far higher and
a process may raise its own soft limit up to it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

try:
    import resource
except ImportError:  # not on this platform: nothing to raise
    resource = None


def allow_open_files(wanted: int) -> int:
    """Raises the soft limit on open files to `wanted` if it is lower and the hard limit allows
    (to the hard limit if not, with a warning); returns the soft limit now in force (-1: the
    platform has none to read)."""
    if resource is None:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target < wanted:
        log.warning("open files: %d wanted, the hard limit allows %d", wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
