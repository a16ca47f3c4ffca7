"""Strict parser of a packed UCX worker address, run before UCX ever sees a peer's bytes.

UCX trusts the address it is handed: `ucp_address_unpack` (src/ucp/wireup/address.c, UCX 1.21)
takes no buffer length, aborts the process on an unknown address version, and the transports
then read device and interface addresses of the length they expect. So a peer-supplied address
is walked here first, with a bounds check on every field, and refused with InvalidAddress
naming the bad field. Only the layout UCX 1.21 packs for a worker address in non-unified mode
is accepted (`ucp_worker_get_address`: uuid, optional debug name, devices, interfaces, no
endpoint addresses), in either address version:

    v1: header = version(4 bits) | flags(4 bits)
    v2: header = version(4 bits) | release(4 bits), flags(8 bits)
    uuid(8) [client_id(8)] [name_len(1) name]
    per device:    md(1: EMPTY | md_index(7)) [v2: md_index(1) if 127]
                   len(1: LAST | NUM_PATHS | SYS_DEVICE | len(5)) [v2: len(1) if 31]
                   [num_paths(1)] [sys_dev(1)] device_address(len)
    per interface: tl_name_csum(2) attrs(v1: 16, v2: 8)
                   len(1: LAST | HAS_EP | len(6)) [v2: len(1) if 63] iface_address(len)

A v1 address ends with a pseudo device (EMPTY | release version, LAST, no address).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from kvferry.transport.dataplane import InvalidAddress

VERSION_V1, VERSION_V2 = 0, 1
HEADER_DEBUG_INFO, HEADER_WORKER_UUID, HEADER_CLIENT_ID = 0x1, 0x2, 0x4
# AM_ONLY (0x8) marks endpoint-scoped addresses; a worker address never carries it.
HEADER_FLAGS_ALLOWED = HEADER_DEBUG_INFO | HEADER_WORKER_UUID | HEADER_CLIENT_ID
MD_EMPTY_DEV, MD_INDEX_MASK = 0x80, 0x7F
DEV_LAST, DEV_NUM_PATHS, DEV_SYS_DEVICE, DEV_LEN_MASK = 0x80, 0x40, 0x20, 0x1F
IFACE_LAST, IFACE_HAS_EP, IFACE_LEN_MASK = 0x80, 0x40, 0x3F
NULL_RESOURCE = 0xFF  # a device list that is empty: nothing to connect to
MAX_RESOURCES = 128  # UCP_MAX_RESOURCES: interfaces UCX unpacks from one address
MAX_MDS = 64  # UCP_MAX_MDS: remote memory domains are bits of a 64-bit map
RELEASE_VERSION_MASK = 0x0F  # v1's closing pseudo device carries the release in its md index
V1_ATTR_BYTES, V2_ATTR_BYTES = 16, 8  # ucp_address_{,v2_}packed_iface_attr_t
IFACE_AM_FLAGS = 0x2 | 0x4  # UCP_ADDR_IFACE_FLAG_AM_SYNC | CB_ASYNC: can carry active messages
SEGMENT_UNIT = 64  # UCP_ADDRESS_IFACE_SEG_SIZE_FACTOR: v2 packs the segment size in these
MIN_AM_SEGMENT_BYTES = 1024  # real transports take 8 KiB; memory keys are a few hundred bytes
MAX_ADDRESS_BYTES = 16 << 10  # far above any real worker address (hundreds of bytes)


@dataclass(frozen=True)
class Iface:
    tl_name_csum: int  # which transport (a checksum of its name)
    address: bytes


@dataclass(frozen=True)
class Device:
    md_index: int
    address: bytes
    ifaces: tuple[Iface, ...]  # empty for a device without transports


@dataclass(frozen=True)
class WorkerAddress:
    version: int
    uuid: int
    devices: tuple[Device, ...]

    def shapes(self) -> dict[int, set[tuple[int, int]]]:
        """Transport checksum -> the (device, interface) address lengths it uses here."""
        shapes: dict[int, set[tuple[int, int]]] = {}
        for device in self.devices:
            for iface in device.ifaces:
                key = (len(device.address), len(iface.address))
                shapes.setdefault(iface.tl_name_csum, set()).add(key)
        return shapes


class _Reader:
    """Bounds-checked cursor; every read names the field it is for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            left = len(self.data) - self.pos
            raise InvalidAddress(
                f"UCX address truncated in {field} at byte {self.pos}: needs {n}, {left} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self, field: str) -> int:
        return self.take(1, field)[0]

    def peek(self, field: str) -> int:
        byte = self.byte(field)
        self.pos -= 1
        return byte

    def extended(self, first: int, mask: int, version: int, field: str) -> int:
        """A value packed in the low bits of `first`; v2 spills a saturated one into a byte."""
        value = first & mask
        if version == VERSION_V2 and value == mask:
            value = self.byte(field)
        return value


def parse_worker_address(data: bytes) -> WorkerAddress:
    """Parse a packed UCX worker address; raises InvalidAddress naming the first bad field."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidAddress(f"UCX address must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_ADDRESS_BYTES:
        raise InvalidAddress(f"UCX address of {len(data)} bytes exceeds {MAX_ADDRESS_BYTES}")
    reader = _Reader(data)
    version, uuid = _header(reader)
    devices = _devices(reader, version)
    if reader.pos != len(data):
        raise InvalidAddress(
            f"UCX address has {len(data) - reader.pos} trailing bytes after its last device"
        )
    return WorkerAddress(version, uuid, devices)


def _header(reader: _Reader) -> tuple[int, int]:
    first = reader.byte("header")
    version = first & 0x0F
    if version == VERSION_V1:
        flags = first >> 4
    elif version == VERSION_V2:
        flags = reader.byte("header flags")
    else:
        raise InvalidAddress(f"UCX address version {version} is not v1 (0) or v2 (1)")
    if flags & ~HEADER_FLAGS_ALLOWED:
        raise InvalidAddress(f"UCX address header flags {flags:#x} are not a worker address's")
    if not flags & HEADER_WORKER_UUID:
        raise InvalidAddress("UCX address has no worker uuid")
    (uuid,) = struct.unpack("<Q", reader.take(8, "worker uuid"))
    if flags & HEADER_CLIENT_ID:
        reader.take(8, "client id")
    if flags & HEADER_DEBUG_INFO:
        reader.take(reader.byte("worker name length"), "worker name")
    return version, uuid


def _devices(reader: _Reader, version: int) -> tuple[Device, ...]:
    if reader.peek("first device") == NULL_RESOURCE:
        raise InvalidAddress("UCX address lists no devices")
    devices: list[Device] = []
    n_ifaces = 0
    last = False
    while not last:
        device, last = _device(reader, version, len(devices))
        n_ifaces += len(device.ifaces)
        if n_ifaces > MAX_RESOURCES:
            raise InvalidAddress(f"UCX address has more than {MAX_RESOURCES} interfaces")
        devices.append(device)
    _check_closing_device(devices[-1], version)
    return tuple(devices)


def _device(reader: _Reader, version: int, index: int) -> tuple[Device, bool]:
    field = f"device {index}"
    md_byte = reader.byte(f"{field} md index")
    md_index = reader.extended(md_byte, MD_INDEX_MASK, version, f"{field} md index")
    len_byte = reader.byte(f"{field} address length")
    length = reader.extended(len_byte, DEV_LEN_MASK, version, f"{field} address length")
    if len_byte & DEV_NUM_PATHS and reader.byte(f"{field} path count") == 0:
        raise InvalidAddress(f"UCX address {field} has 0 paths")
    if len_byte & DEV_SYS_DEVICE:
        reader.byte(f"{field} system device")
    address = reader.take(length, f"{field} address")
    empty, last = bool(md_byte & MD_EMPTY_DEV), bool(len_byte & DEV_LAST)
    if not empty and md_index >= MAX_MDS:
        raise InvalidAddress(f"UCX address {field} md index {md_index} >= {MAX_MDS}")
    ifaces = () if empty else _ifaces(reader, version, field)
    return Device(md_index if not empty else -1, address, ifaces), last


def _check_closing_device(device: Device, version: int) -> None:
    # v1 closes with an empty pseudo device whose md index field holds the release version.
    if version == VERSION_V1 and device.ifaces:
        raise InvalidAddress("UCX v1 address does not end with its release-version device")


def _ifaces(reader: _Reader, version: int, device: str) -> tuple[Iface, ...]:
    ifaces: list[Iface] = []
    last = False
    while not last:
        if len(ifaces) >= MAX_RESOURCES:
            raise InvalidAddress(f"UCX address {device} has more than {MAX_RESOURCES} interfaces")
        iface, last = _iface(reader, version, f"{device} interface {len(ifaces)}")
        ifaces.append(iface)
    return tuple(ifaces)


def _iface(reader: _Reader, version: int, field: str) -> tuple[Iface, bool]:
    (csum,) = struct.unpack("<H", reader.take(2, f"{field} transport checksum"))
    attrs = reader.take(V1_ATTR_BYTES if version == VERSION_V1 else V2_ATTR_BYTES, f"{field} attrs")
    _check_attrs(attrs, version, field)
    len_byte = reader.byte(f"{field} address length")
    if len_byte & IFACE_HAS_EP:
        raise InvalidAddress(f"UCX address {field} carries endpoint addresses")
    length = reader.extended(len_byte, IFACE_LEN_MASK, version, f"{field} address length")
    address = reader.take(length, f"{field} address")
    return Iface(csum, address), bool(len_byte & IFACE_LAST)


def _check_attrs(attrs: bytes, version: int, field: str) -> None:
    if version == VERSION_V1:
        # overhead, bandwidth, latency overhead (float32), then priority and capability bits
        overhead, bandwidth, latency, _ = struct.unpack("<fffI", attrs)
        for name, value in (("overhead", overhead), ("latency", latency)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidAddress(f"UCX address {field} {name} {value} is not >= 0")
    else:
        # fp8 overhead, bandwidth, latency; priority; segment size / 64; flags
        _, bandwidth, _, _, segment, flags = struct.unpack("<BBBBHH", attrs)
        # UCX caps its active messages at the peer's segment and asserts that a rendezvous
        # header (its memory keys) still fits in one.
        if flags & IFACE_AM_FLAGS and segment * SEGMENT_UNIT < MIN_AM_SEGMENT_BYTES:
            raise InvalidAddress(
                f"UCX address {field} takes active messages of {segment * SEGMENT_UNIT} bytes, "
                f"fewer than {MIN_AM_SEGMENT_BYTES}"
            )
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise InvalidAddress(f"UCX address {field} bandwidth {bandwidth} is not > 0")


def check_peer_address(data: bytes, local: WorkerAddress) -> WorkerAddress:
    """Parse a peer's address and refuse it unless every transport it shares with `local`
    packs device and interface addresses of a length `local` packs for that transport.

    Transports read these addresses at the length they expect without checking it (a tcp
    entry with an empty device address is a null pointer to them); entries of transports
    `local` lacks are never handed to one, so any length passes for those."""
    peer = parse_worker_address(data)
    if peer.version != local.version:
        raise InvalidAddress(
            f"UCX address is version {peer.version}, this side packs version {local.version} "
            "(UCX_ADDRESS_VERSION must match on both sides)"
        )
    known = local.shapes()
    for csum, shapes in peer.shapes().items():
        odd = shapes - known.get(csum, shapes)
        if odd:
            dev_len, iface_len = min(odd)
            raise InvalidAddress(
                f"UCX address transport {csum:#06x} has a {dev_len}-byte device and "
                f"{iface_len}-byte interface address; this side packs "
                f"{sorted(known[csum])} for it"
            )
    return peer
