"""The decode daemon's HTTP front as users' tools meet it: the official `openai` client, a
streaming client that leaves mid-answer, a burst of clients connecting at once, and a kept-alive
connection serving several requests."""

import http.client
import json
import socket
import threading
from urllib.parse import urlsplit

import openai
import pytest

from support.cluster import client, wait_for


@pytest.fixture(scope="module")
def openai_client(pair):
    return openai.OpenAI(base_url=client(pair, "decode-0").url + "/v1", api_key="unused")


def test_the_openai_client_completes_a_prompt(openai_client):
    answer = openai_client.completions.create(model="kvferry", prompt="hello", max_tokens=5)
    (choice,) = answer.choices
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert answer.usage.completion_tokens >= 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_the_openai_client_streams_the_same_tokens_as_a_whole_answer(openai_client):
    ids = [5, 6, 7, 8]
    whole = openai_client.completions.create(model="kvferry", prompt=ids, max_tokens=6)
    chunks = list(
        openai_client.completions.create(model="kvferry", prompt=ids, max_tokens=6, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
    assert streamed == whole.choices[0].model_extra["token_ids"]


def test_an_error_reaches_the_openai_client_in_its_shape(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model="kvferry", prompt=[], max_tokens=5)
    assert "the prompt is empty" in str(caught.value)


def test_a_streamed_answer_is_server_sent_events_that_end_and_keep_the_connection(pair):
    parts = urlsplit(client(pair, "decode-0").url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        for _ in range(2):  # the second on the same connection: the first ended cleanly
            body = json.dumps({"prompt": [4, 5, 6], "max_tokens": 3, "stream": True})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 200
            assert reply.getheader("content-type").startswith("text/event-stream")
            assert reply.getheader("cache-control") == "no-cache"
            assert reply.getheader("content-length") is None
            assert reply.getheader("transfer-encoding") == "chunked"
            events = [e for e in reply.read().decode().split("\n\n") if e]
            assert events[-1] == "data: [DONE]"
            last = json.loads(events[-2].removeprefix("data: "))
            assert last["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        conn.close()


def test_a_streaming_client_that_leaves_aborts_its_request(pair):
    decoder = client(pair, "decode-0")
    parts = urlsplit(decoder.url)
    body = json.dumps({"prompt": [9, 8, 7], "max_tokens": 1000, "stream": True}).encode()
    before = _aborted(decoder.metrics())
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: " not in received:  # the stream has begun
            more = sock.recv(65536)
            assert more, received
            received += more
    wait_for(lambda: _aborted(decoder.metrics()) == before + 1, "the request aborted", 60)
    wait_for(lambda: not decoder.status()["requests"]["in_flight"], "the request ended")


def test_a_burst_of_clients_connecting_at_once_all_get_answers(pair):
    """More clients than a small listen backlog holds, all connecting at the same moment."""
    parts = urlsplit(client(pair, "decode-0").url)
    start, answers = threading.Barrier(64), []

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        start.wait()
        try:
            body = json.dumps({"prompt": [1 + i % 50, 2, 3], "max_tokens": 2})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            answers.append((reply.status, json.loads(reply.read())))
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(answers) == 64
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]


def test_one_kept_alive_connection_serves_request_after_request(pair):
    parts = urlsplit(client(pair, "decode-0").url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        for n in range(3):
            body = json.dumps({"prompt": [3, 4, 5 + n], "max_tokens": 2, "stream": n == 1})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 200 and reply.read()
            assert reply.getheader("Connection") != "close"
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
    finally:
        conn.close()


def _aborted(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('kvferry_request_failures_total{kind="aborted"}'):
            return float(line.split()[-1])
    return 0.0


def test_the_openai_client_lists_the_served_model(openai_client):
    (model,) = openai_client.models.list().data
    answer = openai_client.completions.create(model=model.id, prompt=[1, 2], max_tokens=1)
    assert model.id == answer.model and model.owned_by == "kvferry"


def test_a_stream_with_include_usage_ends_with_a_usage_chunk(openai_client):
    chunks = list(
        openai_client.completions.create(
            model="kvferry",
            prompt=[7, 8, 9],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 3


def test_stop_token_ids_end_the_answer_at_the_first_of_them(openai_client):
    prompt = [11, 12, 13]
    free = openai_client.completions.create(model="kvferry", prompt=prompt, max_tokens=8)
    ids = free.choices[0].model_extra["token_ids"]
    stop = ids[3]
    stopped = openai_client.completions.create(
        model="kvferry", prompt=prompt, max_tokens=8, extra_body={"stop_token_ids": [stop]}
    )
    assert stopped.choices[0].model_extra["token_ids"] == ids[: ids.index(stop) + 1]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_answer_before_it_and_is_no_failure(openai_client, pair, stream):
    prompt = [21, 22, 23]
    free = openai_client.completions.create(model="kvferry", prompt=prompt, max_tokens=16)
    text = free.choices[0].text
    stop = next(c for c in text[1:] if c.isascii() and c.isprintable())
    decoder = client(pair, "decode-0")
    failures = _failures(decoder.metrics())
    answer = openai_client.completions.create(
        model="kvferry", prompt=prompt, max_tokens=16, stop=[stop], stream=stream
    )
    chunks = list(answer) if stream else [answer]
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop, 1)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_for(lambda: not decoder.status()["requests"]["in_flight"], "the request ended")
    assert _failures(decoder.metrics()) == failures


def _failures(metrics: str) -> float:
    lines = metrics.splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith("kvferry_request_failures_"))


def test_the_openai_client_chats_whole_and_streamed(openai_client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = openai_client.chat.completions.create(
        model="kvferry", messages=messages, max_completion_tokens=6
    )
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and whole.object == "chat.completion"
    assert whole.usage.completion_tokens == len(choice.model_extra["token_ids"])
    chunks = list(
        openai_client.chat.completions.create(
            model="kvferry", messages=messages, max_tokens=6, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_parameters_kvferry_cannot_honour_are_refused_by_name(openai_client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools="):
        openai_client.chat.completions.create(
            model="kvferry", messages=[{"role": "user", "content": "hi"}], tools=[tool]
        )


def test_unknown_paths_and_a_prefill_daemons_api_are_404s_in_openai_shape(pair):
    for name, method, path in [
        ("decode-0", "GET", "/nope"),
        ("decode-0", "GET", "/v1/completions"),
        ("prefill-0", "POST", "/v1/completions"),
        ("prefill-0", "GET", "/v1/models"),
    ]:
        parts = urlsplit(client(pair, name).url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request(method, path, b"{}" if method == "POST" else None)
            reply = conn.getresponse()
            error = json.loads(reply.read())["error"]
        finally:
            conn.close()
        assert reply.status == 404 and error["type"] == "not_found", (name, path)
        assert error["message"].startswith("no such path") and path in error["message"]
