"""Peer-supplied UCX worker addresses: the parser refuses malformed ones by field, and what it
accepts never crashes UCX. UCX runs in child processes: a crash there aborts the process."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from kvferry.transport.dataplane import InvalidAddress
from kvferry.transport.ucx_address import check_peer_address, parse_worker_address

HARNESS = os.path.join(os.path.dirname(__file__), "ucx_address_fuzz.py")
UUID_FLAG = 0x2
TCP, SELF = 0x19CF, 0x7563  # transport name checksums as UCX 1.21 packs them
V1_ATTRS = struct.pack("<fffI", 1e-8, 1e10, 0.0, 0x034F0000)


def v2_attrs(segment=129, flags=0x7F, bandwidth=0x50):
    return struct.pack("<BBBBHH", 0x10, bandwidth, 0x10, 0, segment, flags)


def iface(csum, address, attrs=V1_ATTRS, last=True, len_flags=0):
    length = len(address) | (0x80 if last else 0) | len_flags
    return struct.pack("<H", csum) + attrs + bytes([length]) + address


def device(md, address, ifaces=(), last=False, empty=False, paths=None):
    flags = (0x80 if last else 0) | (0x40 if paths is not None else 0)
    head = bytes([md | (0x80 if empty else 0), len(address) | flags])
    return head + (bytes([paths]) if paths is not None else b"") + address + b"".join(ifaces)


def v1_address(*devices, header=UUID_FLAG << 4, closing=True):
    release = device(5, b"", last=True, empty=True) if closing else b""
    return bytes([header]) + struct.pack("<Q", 0xABC) + b"".join(devices) + release


def v2_address(*devices, flags=UUID_FLAG):
    return bytes([0x51, flags]) + struct.pack("<Q", 0xABC) + b"".join(devices)


GOOD_V1 = v1_address(
    device(0, b"", [iface(SELF, b"S" * 8)]),
    device(1, b"\x00\x02\x7f\x00\x00\x01", [iface(TCP, b"\x12\x34")]),
)
GOOD_V2 = v2_address(
    device(0, b"", [iface(SELF, b"S" * 8, v2_attrs())]),
    device(1, b"\x00\x02\x7f\x00\x00\x01", [iface(TCP, b"\x12\x34", v2_attrs())], last=True),
)


def refused(data: bytes, words: str) -> None:
    with pytest.raises(InvalidAddress, match=words):
        parse_worker_address(data)


def test_parses_both_versions():
    for data, version in ((GOOD_V1, 0), (GOOD_V2, 1)):
        address = parse_worker_address(data)
        assert address.version == version and address.uuid == 0xABC
        assert address.shapes() == {SELF: {(0, 8)}, TCP: {(6, 2)}}


def test_refuses_other_versions_and_garbage():
    refused(bytes([0x2F]) + GOOD_V1[1:], "version 15")
    refused(b"\xff" * 217, "version 15")
    refused(b"", "truncated in header")
    refused("text", "must be bytes")  # type: ignore[arg-type]
    refused(b"\x20" * 20_000, "exceeds")


def test_every_truncation_is_refused():
    for data in (GOOD_V1, GOOD_V2):
        for end in range(len(data)):
            refused(data[:end], "truncated")


def test_refuses_trailing_bytes():
    refused(GOOD_V1 + b"\x00", "1 trailing bytes")


def test_refuses_header_flags_of_other_addresses():
    refused(v1_address(device(0, b"", [iface(SELF, b"")]), header=0x00), "no worker uuid")
    refused(bytes([0x51, UUID_FLAG | 0x8]) + GOOD_V2[2:], "header flags 0xa")
    refused(v1_address(header=(UUID_FLAG << 4))[:9] + b"\xff", "lists no devices")


def test_refuses_bad_device_fields():
    refused(v1_address(device(100, b"", [iface(SELF, b"")])), "device 0 md index 100")
    refused(v1_address(device(1, b"", [iface(SELF, b"")], paths=0)), "device 0 has 0 paths")
    refused(
        v1_address(device(1, b"", [iface(SELF, b"")], last=True), closing=False), "release-version"
    )


def test_refuses_bad_interface_fields():
    with_ep = iface(SELF, b"S" * 8, len_flags=0x40)
    refused(v1_address(device(0, b"", [with_ep])), "interface 0 carries endpoint addresses")
    many = [iface(SELF, b"", last=False)] * 128 + [iface(SELF, b"")]
    refused(v1_address(device(0, b"", many)), "more than 128 interfaces")
    for bandwidth in (0.0, -1.0, math.nan):
        attrs = struct.pack("<fffI", 1e-8, bandwidth, 0.0, 0)
        refused(v1_address(device(0, b"", [iface(SELF, b"", attrs)])), "bandwidth")
    attrs = struct.pack("<fffI", math.inf, 1e10, 0.0, 0)
    refused(v1_address(device(0, b"", [iface(SELF, b"", attrs)])), "overhead inf")
    small = iface(SELF, b"", v2_attrs(segment=0))
    refused(v2_address(device(0, b"", [small], last=True)), "active messages of 0 bytes")


def test_peer_must_match_local_layout():
    local = parse_worker_address(GOOD_V1)
    assert check_peer_address(GOOD_V1, local).uuid == 0xABC
    # a tcp entry whose device address is empty: tcp would read a null device address
    swallowed = v1_address(device(0, b"", [iface(TCP, b"\x12\x34")]))
    with pytest.raises(InvalidAddress, match="transport 0x19cf has a 0-byte device"):
        check_peer_address(swallowed, local)
    with pytest.raises(InvalidAddress, match="version 1, this side packs version 0"):
        check_peer_address(GOOD_V2, local)
    # transports this side lacks never reach a transport: any length passes
    unknown = v1_address(device(0, b"xyz", [iface(0x1234, b"q")]))
    check_peer_address(unknown, local)


# Runs in a child: a UcxDataPlane on 127.0.0.1 refuses bad addresses, connects to a good
# one, and reports the addresses of the TCP sockets the process listens on.
PLANE_CHILD = r"""
import json, os, sys
from kvferry.transport.dataplane import InvalidAddress
from kvferry.transport.ucx import UcxDataPlane

def link(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor listdir itself used
        return ""

def listening():
    links = [link(fd) for fd in os.listdir("/proc/self/fd")]
    inodes = {name[8:-1] for name in links if name.startswith("socket:[")}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in open(table).read().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:
                found.append(cols[1].split(":")[0])
    return found

plane, peer = UcxDataPlane("tcp,sm,self", host="127.0.0.1"), UcxDataPlane("tcp,sm,self")
good = peer.address
refusals = {}
for name, bad in (("garbage", b"\xff" * len(good)), ("truncated", good[: len(good) // 2]),
                  ("unreachable", bytes.fromhex(sys.argv[1]))):
    try:
        plane.endpoint(bad, print)
        refusals[name] = None
    except InvalidAddress as exc:
        refusals[name] = str(exc)
plane.endpoint(good, print)
print(json.dumps({"refusals": refusals, "listening": listening()}), flush=True)
plane.close()
peer.close()
"""


def _unreachable_address() -> bytes:
    # well formed, but its only transport is one no UCX here has: UCX raises, not aborts
    return v1_address(device(0, b"", [iface(0x1234, b"q" * 4)]))


def test_ucx_plane_refuses_bad_addresses_and_binds_to_host():
    pytest.importorskip("ucxx", reason="needs the ucxx package")
    arg = _unreachable_address().hex()
    proc = subprocess.run(
        [sys.executable, "-c", PLANE_CHILD, arg], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith('{"refusals"')]
    report = json.loads(line)
    refusals = report["refusals"]
    assert "version 15" in refusals["garbage"]
    assert "truncated" in refusals["truncated"]
    assert "UCX cannot connect to the peer" in refusals["unreachable"]
    # UCX reads its devices once per process: both planes listen on loopback only
    assert report["listening"] and set(report["listening"]) == {"0100007F"}


def test_fuzzed_addresses_never_crash_ucx():
    pytest.importorskip("ucxx", reason="needs the ucxx package")
    argv = [sys.executable, HARNESS, "--mutations", "300", "--batch", "150", "--seed", "11"]
    env = dict(os.environ, UCX_TLS="tcp,sm,self")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["crashes"] == [], summary["crashes"][:3]
    assert proc.returncode == 0
    assert summary["rejected"] > 0 and summary["endpoint"] > 0  # both sides were exercised
