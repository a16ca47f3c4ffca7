"""The API key of an HTTP front: read from a file or the environment, asked of /v1/* only, a 401
in OpenAI's shape otherwise (the router's: tests/daemon/router/test_router_api_key.py)."""

import httpx
import openai
import pytest

from kvferry.daemon.server.api_key import read_api_key
from kvferry.daemon.server.config import ConfigError, DaemonConfig, parse
from support.cluster import client, decode, prefill, running, write

KEY = "sk-kvferry-test-0123456789"


def test_the_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    file = tmp_path / "key"
    file.write_text(f"  {KEY}\n")
    assert read_api_key(str(file), None) == KEY
    monkeypatch.setenv("KVFERRY_TEST_KEY", KEY)
    assert read_api_key(None, "KVFERRY_TEST_KEY") == KEY
    assert read_api_key(None, None) is None


@pytest.mark.parametrize(
    "source, fragment",
    [
        ({"api_key_file": "/no/such/key"}, "api_key_file='/no/such/key': No such file"),
        (
            {"api_key_env": "KVFERRY_UNSET_KEY"},
            "api_key_env='KVFERRY_UNSET_KEY': the API key is empty",
        ),
    ],
)
def test_a_missing_or_empty_key_is_named_by_its_source(source, fragment):
    with pytest.raises(ValueError, match=fragment):
        read_api_key(source.get("api_key_file"), source.get("api_key_env"))


def test_one_source_only():
    fields = {"role": "decode", "api_key_file": "/k", "api_key_env": "K"}
    with pytest.raises(ConfigError, match="give one source of the API key"):
        parse(fields, DaemonConfig)


def test_the_decode_front_asks_the_key_of_its_api_only(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    p = prefill("prefill-0")
    path = write(tmp_path, [p, decode("decode-0", [p], api_key_file=str(key_file))])
    with running(path) as launcher:
        url = client(launcher, "decode-0").url
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        assert good.completions.create(model="m", prompt=[1, 2, 3], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong").models.list()
        bare = httpx.post(f"{url}/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in bare.text
        assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need none
        assert httpx.get(f"{url}/metrics").status_code == 200
