"""Control addresses whose host is a DNS name that may stand for several hosts (a Kubernetes
headless service answers with one A record per pod): `resolve` gives one address per host.

`KVFERRY_HOSTS_FILE` names a hosts-format file (`<ip> <name> ...` per line, `#` comments)
consulted before DNS: static fleets without DNS, and tests that change what a name stands for.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from kvferry.transport.messages import TCP_ADDRESS

HOSTS_FILE_ENV = "KVFERRY_HOSTS_FILE"


def resolve(address: str) -> list[str]:
    """`tcp://<host>:<port>` as one `tcp://<ip>:<port>` per host the name stands for, sorted;
    an IP address as itself. OSError when the name resolves to nothing."""
    match = TCP_ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f"{address!r} is not tcp://<host>:<port>")
    host, port = match.group(1), int(match.group(2))
    if _is_ip(host.strip("[]")):
        return [address]
    ips = _from_hosts_file(host) or _from_dns(host, port)
    if not ips:
        raise OSError(f"{host} resolves to no address")
    return sorted(f"tcp://{bracketed(ip)}:{port}" for ip in set(ips))


def _from_dns(host: str, port: int) -> list[str]:
    for family in (socket.AF_INET, socket.AF_INET6):  # IPv4 first: "localhost" is one host
        try:
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        if infos:
            return [info[4][0] for info in infos]
    raise OSError(f"{host}: no such host")


def _from_hosts_file(host: str) -> list[str]:
    path = os.environ.get(HOSTS_FILE_ENV)
    if not path:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []  # no file (yet): DNS answers
    ips = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and host in fields[1:] and _is_ip(fields[0]):
            ips.append(fields[0])
    return ips


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def bracketed(ip: str) -> str:
    """An IPv6 address as URLs and ZeroMQ addresses write it: in brackets."""
    return f"[{ip}]" if ":" in ip else ip
