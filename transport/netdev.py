"""Which network interface carries a configured host, so UCX can be kept off the others.

UCX's tcp transport listens on every interface that has an IP address unless UCX_NET_DEVICES
names the ones to use. An allow list would also drop RDMA ports (they are network devices to
UCX too), so the data plane denies instead: every IP interface except the host's.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

ANY_HOST = ("", "*", "0.0.0.0", "::")  # bind everywhere: nothing to restrict
SIOCGIFADDR = 0x8915
IF_INET6 = "/proc/net/if_inet6"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_addresses() -> dict[str, set[IPAddress]]:
    """Interface name -> its IP addresses, for interfaces that have one (v4 and v6)."""
    found: dict[str, set[IPAddress]] = {}
    for _, name in socket.if_nameindex():
        ipv4 = _ipv4_of(name)
        if ipv4 is not None:
            found.setdefault(name, set()).add(ipv4)
    for name, ipv6 in _ipv6_addresses():
        found.setdefault(name, set()).add(ipv6)
    return found


def _ipv4_of(name: str) -> ipaddress.IPv4Address | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()))
        except OSError:  # no IPv4 address on this interface
            return None
    return ipaddress.IPv4Address(ifreq[20:24])


def _ipv6_addresses() -> list[tuple[str, ipaddress.IPv6Address]]:
    try:
        with open(IF_INET6) as table:
            rows = [line.split() for line in table]
    except OSError:  # IPv6 disabled
        return []
    return [(row[5], ipaddress.IPv6Address(bytes.fromhex(row[0]))) for row in rows if len(row) == 6]


def interface_of(host: str, interfaces: dict[str, set[IPAddress]]) -> str:
    """The interface that carries `host` (an interface name, an IP or a resolvable name)."""
    if host in interfaces:
        return host
    ip = _resolve(host)
    for name, addresses in interfaces.items():
        if ip in addresses:
            return name
    if ip.is_loopback:  # all of 127/8 is on the loopback interface, which lists one address
        for name, addresses in interfaces.items():
            if any(a.is_loopback and a.version == ip.version for a in addresses):
                return name
    raise ValueError(f"host {host!r} ({ip}) is not an address of any interface here")


def _resolve(host: str) -> IPAddress:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
    except (OSError, IndexError) as exc:
        raise ValueError(f"host {host!r} is neither an interface nor a resolvable address") from exc


def ucx_net_devices(host: str | None) -> str | None:
    """A UCX_NET_DEVICES value that keeps UCX off every IP interface but `host`'s; None when
    there is nothing to restrict (no host, a wildcard host, or no other interface)."""
    if host is None or host in ANY_HOST:
        return None
    interfaces = interface_addresses()
    keep = interface_of(host, interfaces)
    others = sorted(name for name in interfaces if name != keep)
    return "^" + ",".join(others) if others else None
