"""`kvferry status` against a stub daemon: the summary, prefill reachability, bootstrap counters,
missing keys, --json and an unreachable daemon."""

import json
import re
import time

from ports import free_ports
from support.cli_sim import STATUS, invoke, one_error_line, two_daemons, write_yaml


def test_status_summary(stub):
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert f"decode-0: decode, serving, tp=1, {stub.url}" in result.stdout
    assert "requests: waiting 1, arriving 0, running 2" in result.stdout
    assert "rank 0: rooms Transferring 1, Success 7" in result.stdout
    assert "ring 1.0 MiB / 16.0 MiB (high 4.0 MiB)" in result.stdout
    assert "kv pages 30/512 | peers tcp://127.0.0.1:17100" in result.stdout
    assert "| pid 4242 | control tcp://127.0.0.1:41234" in result.stdout


def test_status_shows_each_prefill_as_decode_sees_it(stub):
    stub.status = {**STATUS, "prefill": [dict(STATUS["prefill"][0], last_seen=time.time() - 3)]}
    stub.status["prefill"] += STATUS["prefill"][1:]
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        r"  prefill tcp://127.0.0.1:17100: reachable \| last seen \d+\.\d s ago", lines[2]
    )
    unreachable = "unreachable | last error: no answer in 2s | never seen"
    assert lines[3] == f"  prefill tcp://127.0.0.1:17200: {unreachable}"
    assert lines[4] == "  prefill tcp://127.0.0.1:17300: not probed yet"
    assert lines[5].startswith("  rank 0: ")


def test_status_shows_the_bootstrap_servers_counters(stub):
    counters = {"bad_frames": 2, "refused_registrations": 1, "dropped_replies": 0}
    bootstrap = {"address": "tcp://127.0.0.1:17100", **counters, "failed_frames": 0}
    stub.status = {**STATUS, "role": "prefill", "prefill": [], "bootstrap": bootstrap}
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert (
        "  bootstrap tcp://127.0.0.1:17100: bad_frames 2, refused_registrations 1, "
        "dropped_replies 0, failed_frames 0"
    ) in result.stdout.splitlines()


def test_status_tolerates_missing_keys(stub):
    stub.status = {"role": "prefill", "ranks": [{"rank": 0, "ring": {}}]}
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert "ring ? / ? (high ?)" in result.stdout


def test_status_json_and_an_unreachable_daemon(stub, tmp_path):
    (dead,) = free_ports(1)
    path = write_yaml(tmp_path, two_daemons(dead, stub.server_port))
    result = invoke("status", "--config", path, "--json")
    assert one_error_line(result) == "prefill-0: unreachable (connection refused)"
    missing, answer = json.loads(result.stdout)
    assert missing["name"] == "prefill-0" and missing["error"] == "connection refused"
    assert answer == STATUS
