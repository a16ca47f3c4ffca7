"""The daemon's `security` section: the CURVE key file read at load, and no socket bound beyond
loopback unprotected unless the config says so."""

import pytest

from kvferry.daemon.server.config import ConfigError, DaemonConfig, parse
from kvferry.transport import curve

PREFILL = {"role": "prefill"}
DECODE = {"role": "decode", "prefill": ["tcp://10.0.0.1:17100"]}


@pytest.fixture
def key_file(tmp_path):
    return str(curve.generate(tmp_path / "keys"))


def _daemon(raw: dict) -> DaemonConfig:
    return parse(raw, DaemonConfig)


def test_a_key_file_is_read_at_load(key_file):
    config = _daemon({**PREFILL, "security": {"curve_key_file": key_file}})
    keys = config.security.keys()
    assert keys == curve.load(key_file)
    assert keys.secret.decode() not in repr(config)  # the struct holds the path only


def test_no_key_file_means_no_keys():
    assert _daemon(PREFILL).security.keys() is None


def test_key_file_errors_name_the_file(tmp_path, key_file):
    malformed = tmp_path / "malformed"
    malformed.write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    public_only = tmp_path / "public_only"
    public_only.write_text(
        'curve\n    public-key = "' + curve.load(key_file).public.decode() + '"\n'
    )
    for path, why in [
        (tmp_path / "nowhere", "no such file"),
        (malformed, "not a"),
        (public_only, "no secret key"),
    ]:
        with pytest.raises(ConfigError, match=rf"curve_key_file='{path}'.*{why}"):
            _daemon({**PREFILL, "security": {"curve_key_file": str(path)}})


@pytest.mark.parametrize(
    "raw, refused",
    [
        ({**PREFILL, "host": "10.0.0.1"}, r"host='10\.0\.0\.1' binds the bootstrap socket"),
        ({**PREFILL, "transfer": {"host": "0.0.0.0"}}, r"transfer\.host='0\.0\.0\.0' binds the co"),
        ({**DECODE, "transfer": {"host": "10.0.0.2"}}, r"transfer\.host='10\.0\.0\.2'"),
        ({**DECODE, "host": "10.0.0.2"}, r"host='10\.0\.0\.2' binds the HTTP front .* API key"),
    ],
)
def test_binding_beyond_loopback_unprotected_is_refused(raw, refused):
    with pytest.raises(ConfigError, match=refused) as caught:
        _daemon(raw)
    assert "security.allow_insecure_bind" in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [
        {**PREFILL, "host": "10.0.0.1", "transfer": {"host": "10.0.0.1"}},
        {**DECODE, "host": "10.0.0.2", "transfer": {"host": "10.0.0.2"}},
    ],
)
def test_an_explicit_opt_out_is_accepted(raw):
    config = _daemon({**raw, "security": {"allow_insecure_bind": True}})
    assert config.security.allow_insecure_bind and config.security.keys() is None


def test_keys_and_an_api_key_allow_binding_beyond_loopback(key_file):
    security = {"curve_key_file": key_file}
    _daemon({**PREFILL, "host": "10.0.0.1", "transfer": {"host": "10.0.0.1"}, "security": security})
    decode = {**DECODE, "host": "10.0.0.2", "transfer": {"host": "10.0.0.2"}}
    _daemon({**decode, "security": security, "api_key_env": "KVFERRY_KEY"})
    with pytest.raises(ConfigError, match="HTTP front"):  # keys do not guard the HTTP front
        _daemon({**decode, "security": security})


def test_loopback_needs_neither():
    _daemon({**DECODE, "host": "127.0.0.1", "transfer": {"host": "127.0.0.2"}})


@pytest.mark.parametrize("field", ["control_ports", "ucx_ports"])
def test_port_ranges_are_checked_at_load(field):
    assert getattr(_daemon({**PREFILL, "transfer": {field: "31000-31099"}}).transfer, field)
    with pytest.raises(ConfigError, match=rf"{field}='31099-31000'"):
        _daemon({**PREFILL, "transfer": {field: "31099-31000"}})
