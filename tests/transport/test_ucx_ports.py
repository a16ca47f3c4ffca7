"""UCX's tcp transport listens within `transfer.ucx_ports` (UCX_TCP_PORT_RANGE, set before UCX
loads), so a firewall can open one range for the data plane."""

import json
import subprocess
import sys

import pytest

from ports import free_ports

CHILD = r"""
import json, os, sys
from kvferry.transport.ucx import UcxDataPlane

def inodes():
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return {name[8:-1] for name in links if name.startswith("socket:[")}

plane = UcxDataPlane("tcp,self", host="127.0.0.1", ports=sys.argv[1])
mine, ports = inodes(), []
for row in open("/proc/net/tcp").read().splitlines()[1:]:
    cols = row.split()
    if cols[3] == "0A" and cols[9] in mine:
        ports.append(int(cols[1].split(":")[1], 16))
print(json.dumps({"env": os.environ.get("UCX_TCP_PORT_RANGE"), "ports": ports}), flush=True)
plane.close()
"""


def test_ucx_listens_within_its_port_range():
    pytest.importorskip("ucxx", reason="needs the ucxx package")
    low = free_ports(1)[0]
    spec = f"{low}-{low + 20}"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, spec], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["env"] == spec
    assert report["ports"] and all(low <= port <= low + 20 for port in report["ports"])
