"""Run a command with CUDA MPS, so that the processes sharing a GPU run their kernels side by
side instead of taking turns.

    python bench/mps.py -- python bench/device_reduce.py
    python bench/mps.py -- python bench/transfer.py --data-path native

Starts a private MPS control daemon (kvferry.daemon.cli.mps, which a deployment file's `mps:`
uses too), runs the command on it, and stops the daemon whatever the command's outcome; the
daemon's log is printed if the command failed. `bench/device_reduce.py --mps` uses the same to
time a forward's all-reduces both ways in one run.
"""

from __future__ import annotations

import subprocess
import sys

from kvferry.daemon.cli.mps import NoMPS, mps_server, print_log


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
