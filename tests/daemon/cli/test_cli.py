"""The `kvferry` CLI (config, serve, generate) and its HTTP client, against a stub daemon;
`kvferry status` is in test_cli_status.py."""

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from kvferry.daemon.cli.client import ClientError, DaemonClient, RequestTimeout, ServerError
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.config import load, parse
from ports import free_ports
from support.cli_sim import invoke, one_error_line, two_daemons, write_yaml

LOCAL_YAML = Path(__file__).parents[3] / "deploy" / "tiny.yaml"  # no model to fetch


# --- config, serve, help ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["up"],
        ["generate"],
        ["status"],
        ["config"],
        ["config", "check"],
        ["config", "show"],
    ],
)
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_config_check_accepts_the_embedded_default():
    result = invoke("config", "check", str(LOCAL_YAML))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{LOCAL_YAML}: ok (2 daemons)\n"


def test_config_check_names_an_unknown_field(tmp_path):
    path = write_yaml(tmp_path, {"daemons": [{"role": "prefill", "tpp": 2}]})
    line = one_error_line(invoke("config", "check", path))
    assert "tpp" in line and "$.daemons[0]" in line and path in line


def test_config_check_runs_the_model_checks(tmp_path):
    path = write_yaml(tmp_path, {"daemons": [{"role": "prefill", "name": "p", "tp": 3}]})
    assert "p: tp" in one_error_line(invoke("config", "check", path))


def test_config_check_of_a_missing_file(tmp_path):
    assert "missing.yaml" in one_error_line(
        invoke("config", "check", str(tmp_path / "missing.yaml"))
    )


def test_config_show_fills_every_default_and_round_trips():
    result = invoke("config", "show", str(LOCAL_YAML))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert parse(shown) == load(LOCAL_YAML)
    assert shown["daemons"][0]["model"]["name"] == "kvferry-tiny"  # a default, absent in the file
    assert list(shown["daemons"][0])[:2] == ["role", "name"]  # field order, not sorted


def test_config_show_one_daemon():
    result = invoke("config", "show", str(LOCAL_YAML), "--name", "decode-0")
    assert [d["name"] for d in yaml.safe_load(result.stdout)["daemons"]] == ["decode-0"]
    assert "no daemon named 'decode-9'" in one_error_line(
        invoke("config", "show", str(LOCAL_YAML), "--name", "decode-9")
    )


def test_serve_picks_the_named_daemon(monkeypatch):
    served = []
    fake = types.ModuleType("kvferry.daemon.server.daemon")
    fake.serve = lambda daemon: served.append(daemon) or 3
    monkeypatch.setitem(sys.modules, "kvferry.daemon.server.daemon", fake)
    monkeypatch.delenv("KVFERRY_LOG_LEVEL", raising=False)  # serve sets it; restored after
    result = invoke("serve", "--config", str(LOCAL_YAML), "--name", "decode-0")
    assert result.exit_code == 3
    assert [d.name for d in served] == ["decode-0"]
    assert "pick one with --name" in one_error_line(invoke("serve", "--config", str(LOCAL_YAML)))


# --- generate and the client against a stub daemon -------------------------------------------


def test_generate_json_reports_the_streamed_completion(stub):
    result = invoke(
        "generate", "hi", "--url", stub.url, "--json", "--seed", "7", "--max-tokens", "3"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert list(answer) == [
        "text",
        "token_ids",
        "prompt_tokens",
        "finish_reason",
        "ttft_s",
        "latency_s",
        "timeline",
    ]
    assert answer["text"] == "Hello" and answer["token_ids"] == [72, 101, 108]
    assert (answer["prompt_tokens"], answer["finish_reason"]) == (3, "length")
    assert 0 <= answer["ttft_s"] <= answer["latency_s"]
    assert answer["timeline"] is None  # this stub sends none; kvferry's daemons do
    assert stub.seen == [
        {
            "prompt": "hi",
            "max_tokens": 3,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 7,
            "stream": True,
        }
    ]


def test_generate_prints_text_as_it_streams(stub):
    result = invoke("generate", "hi", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello\n"
    assert "3 tokens, finish length" in result.stderr


def test_generate_token_ids_unstreamed(stub):
    result = invoke(
        "generate", "--prompt-ids", "1, 2,3", "--url", stub.url, "--no-stream", "--json"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["text"] == "Hello" and answer["ttft_s"] is None
    assert stub.seen[0]["prompt"] == [1, 2, 3] and stub.seen[0]["stream"] is False


def test_generate_finds_the_decode_daemon_in_a_config(stub, tmp_path):
    (dead,) = free_ports(1)
    path = write_yaml(tmp_path, two_daemons(dead, stub.server_port))
    result = invoke("generate", "hi", "--config", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == "Hello"


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ("too long", "HTTP 400: prompt has 5000 tokens, max_prompt_tokens=4096"),
        ("fail midway", ": peer lost"),
        ("cut short", "the stream ended before [DONE]"),
    ],
)
def test_generate_errors_are_one_line(stub, prompt, fragment):
    result = invoke("generate", prompt, "--url", stub.url)
    line = one_error_line(result)
    assert fragment in line and stub.url in line
    if prompt != "too long":
        assert result.stdout == "He\n"  # what arrived before the error, line ended


def test_generate_against_nothing_names_the_url():
    (dead,) = free_ports(1)
    line = one_error_line(invoke("generate", "hi", "--url", f"http://127.0.0.1:{dead}"))
    assert line == f"Error: http://127.0.0.1:{dead}: connection refused"


@pytest.mark.parametrize(
    "args", [["hi", "--prompt-ids", "1"], [], ["--prompt-ids", "1,x"], ["--prompt-ids", ","]]
)
def test_generate_usage_errors(args):
    result = invoke("generate", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_client_streams_and_times_out(stub):
    client = DaemonClient(stub.url, timeout=5)
    assert client.health() == {"status": "ok"} and client.is_ready()
    pieces = []
    completion = client.stream(CompletionRequest(prompt="hi"), pieces.append)
    assert pieces == ["He", "llo"] and completion.token_ids == [72, 101, 108]
    assert client.complete(CompletionRequest(prompt=[5])).finish_reason == "length"
    with pytest.raises(ServerError, match="no route") as caught:
        client._get("/nowhere")
    assert caught.value.status == 404
    with pytest.raises(RequestTimeout):
        DaemonClient(stub.url, timeout=0.2).stream(CompletionRequest(prompt="slow"))
    with pytest.raises(ClientError, match="not an http"):
        DaemonClient("127.0.0.1:17000")
