"""A private CUDA MPS server for the processes that share a GPU (`mps:` of a deployment file,
bench/mps.py).

Without MPS the driver gives a GPU to one process at a time: TP ranks sharing one GPU
(deploy/one-gpu.yaml) wait for a switch of contexts at every all-reduce, and the decode rank's
steps take turns with the prefill forwards. On an MPS server their kernels run side by side.
`mps_server()` starts a private MPS control daemon (its pipe and log folders in a temporary
directory, named to the processes it serves through CUDA_MPS_PIPE_DIRECTORY and
CUDA_MPS_LOG_DIRECTORY, so that no other process on the machine is moved onto it) and stops
it on the way out, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
CONTROL_TIMEOUT_S = 30.0


class NoMPS(RuntimeError):
    """MPS cannot be started here (the reason is the message)."""


@contextlib.contextmanager
def mps_server() -> Iterator[dict[str, str]]:
    """A private MPS control daemon for the time of the block: the environment that puts a
    process's CUDA work on it (start CUDA processes with it; a process that set up CUDA before
    stays outside). NoMPS, with the reason, where it cannot start."""
    control = shutil.which(CONTROL)
    if control is None:
        raise NoMPS(f"{CONTROL} is not on the PATH")
    with tempfile.TemporaryDirectory(prefix="kvferry-mps-") as root:
        pipes, logs = Path(root, "pipe"), Path(root, "log")
        pipes.mkdir()
        logs.mkdir()
        env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(pipes), CUDA_MPS_LOG_DIRECTORY=str(logs))
        try:
            started = subprocess.run(
                [control, "-d"], env=env, capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NoMPS(f"{CONTROL} -d: {exc}") from None
        if started.returncode != 0:
            raise NoMPS(f"{CONTROL} -d exited {started.returncode}: {started.stderr.strip()}")
        try:
            yield env
        finally:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [control], input="quit\n", env=env, text=True, capture_output=True,
                    timeout=CONTROL_TIMEOUT_S,
                )  # fmt: skip


def print_log(env: dict[str, str]) -> None:
    """The MPS daemon's log (inside the `mps_server` block), to stderr."""
    for log in sorted(Path(env["CUDA_MPS_LOG_DIRECTORY"]).glob("*.log")):
        print(f"--- {log.name} (MPS)\n{log.read_text()[-4000:]}", file=sys.stderr)
