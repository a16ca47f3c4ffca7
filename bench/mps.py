"""Run a command with CUDA MPS, so that the processes sharing a GPU run their kernels side by
side instead of taking turns.

    python bench/mps.py -- python bench/device_reduce.py
    python bench/mps.py -- python bench/campaign.py --stages e2e --deploy deploy/one-gpu.yaml

Without MPS the driver gives a GPU to one process at a time: TP ranks sharing one GPU
(deploy/one-gpu.yaml) wait for a switch of contexts at every all-reduce, and the decode rank's
steps take turns with the prefill forwards. This starts a private MPS control daemon (its pipe
and log folders in a temporary directory, named to the command through
CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY, so that no other process on the machine is
moved onto it), runs the command, and stops the daemon whatever the command's outcome; the
daemon's log is printed if the command failed. `bench/device_reduce.py --mps` uses the same to
time a forward's all-reduces both ways in one run.
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
    stays outside)."""
    control = shutil.which(CONTROL)
    if control is None:
        raise NoMPS(f"{CONTROL} is not on the PATH")
    with tempfile.TemporaryDirectory(prefix="kvferry-mps-") as root:
        pipes, logs = Path(root, "pipe"), Path(root, "log")
        pipes.mkdir()
        logs.mkdir()
        env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(pipes), CUDA_MPS_LOG_DIRECTORY=str(logs))
        started = subprocess.run(
            [control, "-d"], env=env, capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S
        )
        if started.returncode != 0:
            raise NoMPS(f"{CONTROL} -d exited {started.returncode}: {started.stderr.strip()}")
        try:
            yield env
        finally:
            subprocess.run(
                [control], input="quit\n", env=env, text=True, capture_output=True,
                timeout=CONTROL_TIMEOUT_S,
            )  # fmt: skip


def print_log(env: dict[str, str]) -> None:
    """The MPS daemon's log (inside the `mps_server` block), to stderr."""
    for log in sorted(Path(env["CUDA_MPS_LOG_DIRECTORY"]).glob("*.log")):
        print(f"--- {log.name} (MPS)\n{log.read_text()[-4000:]}", file=sys.stderr)


def main() -> int:
    command = sys.argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if command else 2
    try:
        with mps_server() as env:
            code = subprocess.run(command, env=env).returncode
            if code != 0:
                print_log(env)
    except NoMPS as exc:
        print(f"mps.py: no MPS here: {exc}", file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
