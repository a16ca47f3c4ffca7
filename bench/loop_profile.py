"""`--profile DIR` of the transfer benches: each rank's transfer thread under cProfile, timed
by a CPU clock (a wall clock would count the waits for events and for the GIL).

Before Python 3.12 cProfile records only the thread that enabled it, and its clock is that
thread's CPU time. From 3.12 on it records every thread of the process while it is enabled (it
is built on sys.monitoring), so its clock is the process's CPU time and each file also holds
what the rank's other threads ran meanwhile; sort by `tottime` and look at the transfer
modules' functions.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import sys
import time


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """`--profile DIR`: each transfer thread runs under cProfile (see `profile_loops`)."""
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run each rank's transfer thread under cProfile and write its statistics to "
        "DIR/<thread>-<pid>.prof when it ends (python -m pstats reads them); the CPU figures "
        "then include the profiler's own cost",
    )


def profile_loops(directory: str | None) -> None:
    """Make every transfer loop started in this process from now on run under cProfile, its
    statistics written into `directory` as it ends (a no-op for None)."""
    from kvferry.transport.loop import AgentLoop

    if directory is None or getattr(AgentLoop._run, "profiled", False):
        return
    os.makedirs(directory, exist_ok=True)
    run = AgentLoop._run

    @functools.wraps(run)
    def profiled(loop: AgentLoop) -> None:
        profile = cProfile.Profile(
            time.thread_time if sys.version_info < (3, 12) else time.process_time
        )
        profile.enable()
        try:
            run(loop)
        finally:
            profile.disable()
            name = f"{loop._thread.name}-{os.getpid()}.prof"
            profile.dump_stats(os.path.join(directory, name))

    profiled.profiled = True
    AgentLoop._run = profiled
