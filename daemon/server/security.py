"""Who may reach a daemon's sockets: the CURVE key file of the bootstrap and control sockets,
and the rule that nothing binds beyond loopback unprotected unless the config says so."""

from __future__ import annotations

import msgspec

from kvferry.transport import curve


class SecuritySection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # the deployment's CURVE key pair (`kvferry keys generate DIR`): every daemon and rank holding
    # it is a member; the bootstrap and control sockets refuse everyone else in the handshake
    curve_key_file: str | None = None
    # bind the bootstrap and control sockets (and a decode HTTP front without an API key) to a
    # non-loopback address without that protection
    allow_insecure_bind: bool = False

    def __post_init__(self) -> None:
        if self.curve_key_file is not None:
            curve.load(self.curve_key_file)  # refused at load, naming the file; not kept here

    def keys(self) -> curve.CurveKeys | None:
        """The key pair, read from the file (None: no CURVE)."""
        return curve.load(self.curve_key_file) if self.curve_key_file is not None else None


def check_binds(daemon) -> None:
    """Refuse a DaemonConfig that binds beyond loopback without keys (or without an API key, for a
    decode daemon's HTTP front), unless `security.allow_insecure_bind` says so."""
    security = daemon.security
    if security.allow_insecure_bind:
        return
    if security.curve_key_file is None:
        zmq_sockets = (
            ("host", daemon.host, "the bootstrap socket") if daemon.role == "prefill" else None,
            ("transfer.host", daemon.transfer.host, "the control sockets"),
        )
        for name, host, what in filter(None, zmq_sockets):
            if not curve.is_loopback(host):
                raise ValueError(
                    f"{name}={host!r} binds {what} beyond loopback without "
                    "security.curve_key_file; set one (kvferry keys generate DIR) or "
                    "security.allow_insecure_bind: true"
                )
    has_key = daemon.api_key_file is not None or daemon.api_key_env is not None
    if daemon.role == "decode" and not has_key and not curve.is_loopback(daemon.host):
        raise ValueError(
            f"host={daemon.host!r} binds the HTTP front beyond loopback without an API key; "
            "set api_key_file or api_key_env, or security.allow_insecure_bind: true"
        )
