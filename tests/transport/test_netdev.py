"""The interface that carries the configured host, and the UCX_NET_DEVICES that keeps UCX on it."""

import ipaddress
import re

import pytest

from kvferry.transport.netdev import interface_addresses, interface_of, ucx_net_devices


def _loopback() -> str:
    interfaces = interface_addresses()
    names = [n for n, ips in interfaces.items() if ipaddress.ip_address("127.0.0.1") in ips]
    if not names:
        pytest.skip("no interface carries 127.0.0.1 here")
    return names[0]


def test_loopback_host_is_the_loopback_interface():
    lo = _loopback()
    interfaces = interface_addresses()
    assert interface_of("127.0.0.1", interfaces) == lo
    assert interface_of("127.0.0.2", interfaces) == lo  # all of 127/8
    assert interface_of(lo, interfaces) == lo  # an interface name, as ZeroMQ accepts


def test_net_devices_deny_every_other_ip_interface():
    lo = _loopback()
    others = sorted(name for name in interface_addresses() if name != lo)
    expected = "^" + ",".join(others) if others else None
    assert ucx_net_devices("127.0.0.1") == expected


def test_wildcard_hosts_restrict_nothing():
    for host in (None, "0.0.0.0", "::", "*"):
        assert ucx_net_devices(host) is None


def test_host_on_no_interface_is_an_error():
    with pytest.raises(ValueError, match=re.escape("'203.0.113.77'")):
        ucx_net_devices("203.0.113.77")
