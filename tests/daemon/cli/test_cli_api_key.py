"""`kvferry generate` and `kvferry bench` against a decode daemon that asks an API key: sent from
--api-key-file, $KVFERRY_API_KEY or the source the deployment file names; without it a clear
401 and a non-zero exit; the key never printed nor written into results."""

import json

import pytest

from kvferry.daemon.cli.api_key import ENV
from support.cli_sim import invoke, one_error_line
from support.cluster import client, decode, prefill, running, write

KEY = "sk-kvferry-cli-0123456789"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "key"
    key_file.write_text(KEY + "\n")
    p = prefill("prefill-0")
    path = write(folder, [p, decode("decode-0", [p], api_key_file=str(key_file))])
    with running(path) as launcher:
        yield str(path), client(launcher, "decode-0").url, str(key_file)


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def generate(*args):
    return invoke("generate", "--prompt-ids", "1,2,3", "--max-tokens", "2", "--json", *args)


def test_generate_without_the_key_is_refused_clearly(deployment):
    _, url, _ = deployment
    line = one_error_line(generate("--url", url))
    assert "HTTP 401" in line and "API key" in line


def test_generate_with_a_wrong_key_is_refused(deployment, tmp_path):
    _, url, _ = deployment
    wrong = tmp_path / "wrong"
    wrong.write_text("sk-wrong")
    assert "HTTP 401" in one_error_line(generate("--url", url, "--api-key-file", str(wrong)))


@pytest.mark.parametrize("source", ["file", "environment", "config"])
def test_generate_sends_the_key_from_each_source(deployment, monkeypatch, source):
    path, url, key_file = deployment
    args = {"file": ["--url", url, "--api-key-file", key_file], "config": ["--config", path]}
    if source == "environment":
        monkeypatch.setenv(ENV, KEY)
    result = generate(*args.get(source, ["--url", url]))
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["token_ids"]) == 2
    assert KEY not in result.output


def test_an_unreadable_key_file_is_named_not_shown(deployment, tmp_path):
    _, url, _ = deployment
    line = one_error_line(generate("--url", url, "--api-key-file", str(tmp_path / "none")))
    assert "API key" in line and "none" in line


def test_bench_with_the_key_completes_and_keeps_it_out_of_the_results(deployment, tmp_path):
    _, url, key_file = deployment
    out = tmp_path / "bench.json"
    args = ["--concurrency", "2", "--num-requests", "4", "--warmup", "0", "--idle", "0"]
    sizes = ["--input-len", "8", "--output-len", "4", "--vocab", "200"]
    result = invoke(
        "bench", "--url", url, "--api-key-file", key_file, *args, *sizes, "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    [point] = json.loads(out.read_text())["points"]
    assert point["ok"] == 4
    assert KEY not in out.read_text() and KEY not in result.output


def test_bench_without_the_key_fails_its_requests(deployment, tmp_path):
    _, url, _ = deployment
    out = tmp_path / "bench.json"
    args = ["--concurrency", "1", "--num-requests", "2", "--warmup", "0", "--idle", "0"]
    sizes = ["--input-len", "8", "--output-len", "4", "--vocab", "200", "--out", str(out)]
    invoke("bench", "--url", url, *args, *sizes)
    [point] = json.loads(out.read_text())["points"]
    assert point["ok"] == 0


def test_bench_of_a_deployment_reads_the_key_its_config_names(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFERRY_TEST_BENCH_KEY", KEY)
    p = prefill("prefill-0")
    path = write(tmp_path, [p, decode("decode-0", [p], api_key_env="KVFERRY_TEST_BENCH_KEY")])
    out = tmp_path / "bench.json"
    args = ["--concurrency", "1", "--num-requests", "2", "--warmup", "0", "--idle", "0"]
    sizes = ["--input-len", "8", "--output-len", "4", "--out", str(out)]
    result = invoke("bench", "--config", str(path), *args, *sizes)
    assert result.exit_code == 0, result.output
    [point] = json.loads(out.read_text())["points"]
    assert point["ok"] == 2 and KEY not in out.read_text()
