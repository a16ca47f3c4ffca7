"""The UCX options a rank sets before UCX reads them, unless its environment sets them: on a
host of one GPU a rendezvous over cuda_ipc may be read by its receiver (get), which UCX allows
by itself only between GPUs joined by NVLink."""

import json
import os
import subprocess
import sys

import pytest

from kvferry.transport.ucx_load import ONE_GPU, TCP_SEGMENTS, defaults


def test_a_host_of_one_gpu_lets_receivers_pull():
    assert defaults(1).items() >= {**ONE_GPU, **TCP_SEGMENTS}.items()
    for gpus in (0, 2, 8):  # none, or NVLink's and UCX's call (it probes the links itself)
        assert defaults(gpus).items() >= TCP_SEGMENTS.items()
        assert not defaults(gpus).keys() & ONE_GPU.keys()


LOAD = """
import json, os
from kvferry.transport import ucx_load
ucx_load.host_gpus = lambda: 1  # as on a host of one GPU
ucx_load.load_ucxx(gpu=True)
print(json.dumps({name: os.environ.get(name) for name in ucx_load.ONE_GPU}))
"""


@pytest.mark.parametrize("preset", [None, "n"])
def test_the_environment_has_the_last_word(preset):
    pytest.importorskip("ucxx", reason="the UCX data plane needs the ucxx package")
    env = {k: v for k, v in os.environ.items() if k not in ONE_GPU}
    if preset is not None:
        env.update(dict.fromkeys(ONE_GPU, preset))
    run = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {
        name: preset or value for name, value in ONE_GPU.items()
    }
