"""Several prefill daemons behind one decode daemon, as real processes over loopback: prompts go
to the least-loaded prefill, and a prefill that a name starts to stand for receives prompts
without decode restarting."""

import signal

import zmq

from kvferry.daemon.cli.client import DaemonClient
from kvferry.transport.control import request as control_request
from kvferry.transport.messages import Ack, Codec, SubmitPrompt
from kvferry.transport.resolve import HOSTS_FILE_ENV
from ports import free_port
from support.cluster import (
    FAST_TRANSFER,
    client,
    decode,
    generate,
    prefill,
    running,
    wait_for,
    write,
)
from support.metrics_sim import samples

PROMPT = list(range(1, 11))
# prompts a prefill keeps waiting for their rooms' registration this long
PATIENT = {**FAST_TRANSFER, "bootstrap_timeout_s": 120}


def picks(decode_client: DaemonClient) -> dict[str, float]:
    """kvferry_prefill_picks_total by prefill address."""
    return {
        dict(labels)["prefill"]: value
        for (name, labels), value in samples(decode_client.metrics()).items()
        if name == "kvferry_prefill_picks_total"
    }


def addresses(decode_client: DaemonClient) -> list[str]:
    return [s["address"] for s in decode_client.status()["prefill"]]


def queued_tokens(decode_client: DaemonClient, address: str) -> int:
    states = decode_client.status()["prefill"]
    return next((s["queued_tokens"] for s in states if s["address"] == address), 0)


def test_a_prefill_with_a_long_queue_gets_no_prompt_while_another_is_idle(tmp_path):
    # its held prompts keep it draining at stop: drain_timeout_s bounds that
    busy = prefill("busy", transfer=PATIENT, drain_timeout_s=5)
    idle = prefill("idle")
    path = write(tmp_path, [busy, idle, decode("decode-0", [busy, idle])])
    busy_address = f"tcp://127.0.0.1:{busy['bootstrap_port']}"
    with running(path) as launcher, zmq.Context() as context:
        # prompts for rooms no decode rank registers: the busy prefill holds them, queued
        codec = Codec()
        for room in range(1, 5):
            message = SubmitPrompt(room, list(range(1, 201)))
            assert isinstance(control_request(context, codec, busy_address, message, 10), Ack)
        decode_client = client(launcher, "decode-0")
        wait_for(lambda: queued_tokens(decode_client, busy_address) >= 800, "the busy queue")
        for _ in range(4):
            assert generate(launcher, "decode-0", PROMPT, max_tokens=2).finish_reason == "length"
        chosen = picks(decode_client)
        assert chosen.get(busy_address, 0) == 0
        assert chosen[f"tcp://127.0.0.1:{idle['bootstrap_port']}"] == 4


def test_a_prefill_joins_when_its_name_starts_to_stand_for_it(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 prefills.test\n")
    monkeypatch.setenv(HOSTS_FILE_ENV, str(hosts))  # the daemons inherit it
    port = free_port()
    first = prefill("first", bootstrap_port=port)
    second = prefill("second", bootstrap_port=port, host="127.0.0.2")
    d = decode("decode-0", [], prefill=[f"tcp://prefills.test:{port}"])
    path = write(tmp_path, [first, second, d])
    with running(path) as launcher:
        decode_client = client(launcher, "decode-0")
        assert generate(launcher, "decode-0", PROMPT).finish_reason == "length"
        assert list(picks(decode_client)) == [f"tcp://127.0.0.1:{port}"]
        hosts.write_text("127.0.0.1 prefills.test\n127.0.0.2 prefills.test\n")
        joined = f"tcp://127.0.0.2:{port}"
        wait_for(lambda: joined in addresses(decode_client), "the second prefill to join", 60)
        for _ in range(2):
            assert generate(launcher, "decode-0", PROMPT).finish_reason == "length"
        assert picks(decode_client)[joined] >= 1


def test_a_prompt_refused_by_a_stopping_prefill_is_served_by_another(tmp_path):
    """A prefill draining at stop still answers probes but refuses new prompts: the request it
    refuses goes to the other prefill, which backs the refuser off."""
    stopping = prefill("stopping", transfer=PATIENT, drain_timeout_s=60)
    spare = prefill("spare", transfer=PATIENT, drain_timeout_s=5)
    path = write(tmp_path, [stopping, spare, decode("decode-0", [stopping, spare])])
    stopping_address = f"tcp://127.0.0.1:{stopping['bootstrap_port']}"
    spare_address = f"tcp://127.0.0.1:{spare['bootstrap_port']}"
    with running(path, expect_clean_exit=False) as launcher, zmq.Context() as context:
        # held prompts: one token keeps `stopping` draining, fifty make the spare look busier
        for address, held in ((stopping_address, [1]), (spare_address, list(range(50)))):
            reply = control_request(context, Codec(), address, SubmitPrompt(1, held), 10)
            assert isinstance(reply, Ack)
        decode_client = client(launcher, "decode-0")
        wait_for(lambda: queued_tokens(decode_client, spare_address) == 50, "the spare's load")
        process = next(c for c in launcher.children if c.name == "stopping").process
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: client(launcher, "stopping").status()["state"] == "stopping", "drain")
        answers = [generate(launcher, "decode-0", PROMPT, max_tokens=2) for _ in range(3)]
        assert all(a.finish_reason == "length" for a in answers)
        assert answers[0].token_ids == answers[1].token_ids == answers[2].token_ids
        metrics = samples(decode_client.metrics())
        assert metrics[("kvferry_prefill_retries_total", frozenset())] >= 1
        backoffs = ("kvferry_prefill_backoffs_total", frozenset({("prefill", stopping_address)}))
        assert metrics[backoffs] >= 1
        process.kill()
