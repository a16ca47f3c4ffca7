"""A router in front of two real decode daemons (one prefill daemon, the tiny random model, over
loopback): bursts spread by load, the official `openai` client, a target that joins when a
name starts to stand for it."""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from support.cluster import decode, prefill, running, wait_for, write
from support.router_sim import attempts, complete

PROMPT = list(range(1, 11))
# room for a few long answers (the busy daemon's) besides the bursts
ROOMY = {"page_size": 4, "num_pages": 1024}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(decode-0 URL, decode-1 URL) of a running prefill + two decode deployment."""
    p = prefill("prefill-0")
    daemons = [p, decode("decode-0", [p], cache=ROOMY), decode("decode-1", [p], cache=ROOMY)]
    path = write(tmp_path_factory.mktemp("fleet"), daemons)
    with running(path) as launcher:
        urls = {c.name: c.url for c in launcher.children}
        yield urls["decode-0"], urls["decode-1"]


def burst(url: str, count: int, **fields) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(complete, url, prompt=PROMPT, max_tokens=4, **fields) for _ in range(count)
        ]
        return [future.result() for future in futures]


def served(router_url: str) -> dict[str, float]:
    """Answers each target gave through the router."""
    return {t: n for (t, outcome), n in attempts(router_url).items() if outcome == "ok"}


def test_a_burst_is_spread_over_both_decode_daemons(fleet, routers):
    router = routers(list(fleet))
    answers = burst(router.url, 12) + burst(router.url, 4, stream=True)
    assert [a.status_code for a in answers] == [200] * 16
    counts = served(router.url)
    assert set(counts) == set(fleet) and all(n >= 3 for n in counts.values()), counts


def test_a_decode_daemon_with_many_requests_in_flight_gets_fewer(fleet, routers):
    busy, idle = fleet
    router = routers([busy, idle])
    with long_streams(busy, 3):
        wait_for(lambda: _load(router.url, busy) >= 3, "the router to see the busy daemon's load")
        answers = burst(router.url, 6)
        assert [a.status_code for a in answers] == [200] * 6
    counts = served(router.url)
    assert counts.get(idle, 0) > counts.get(busy, 0), counts


def test_the_openai_package_against_the_router(fleet, routers):
    router = routers(list(fleet))
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    assert model == "kvferry-tiny"
    whole = client.completions.create(model=model, prompt="Hello", max_tokens=5)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 5
    parts = client.completions.create(model=model, prompt="Hello", max_tokens=5, stream=True)
    assert "".join(part.choices[0].text for part in parts) == whole.choices[0].text
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=5)
    assert chat.choices[0].message.role == "assistant"
    deltas = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in deltas if chunk.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt="Hello", max_tokens=0)


def test_a_decode_daemon_joins_when_the_name_starts_to_stand_for_it(fleet, routers):
    first, second = fleet
    name = "http://decodes.test:8000"
    stands_for = {name: [first]}

    async def resolver(url: str) -> list[str]:
        return list(stands_for[url])

    router = routers([name], resolver=resolver)
    assert [complete(router.url, prompt=PROMPT).status_code for _ in range(2)] == [200, 200]
    assert set(served(router.url)) == {first}
    stands_for[name] = [first, second]
    wait_for(lambda: _state(router.url, second) == "up", "the second decode daemon to join")
    for _ in range(4):
        assert complete(router.url, prompt=PROMPT).status_code == 200
    assert served(router.url)[second] >= 1
    stands_for[name] = [second]
    wait_for(lambda: _state(router.url, first) is None, "the first decode daemon to retire")
    before = served(router.url)[first]
    assert complete(router.url, prompt=PROMPT).status_code == 200
    assert served(router.url)[first] == before


@contextlib.contextmanager
def long_streams(url: str, count: int):
    """`count` long streamed completions on the daemon at `url` (not through the router), held
    open until the block ends; closing them aborts them on the daemon."""
    body = {"prompt": PROMPT, "max_tokens": 900, "stream": True}
    with httpx.Client(timeout=60) as client, contextlib.ExitStack() as streams:
        for _ in range(count):
            stream = client.stream("POST", f"{url}/v1/completions", json=body)
            assert streams.enter_context(stream).status_code == 200
        yield


def _target(router_url: str, url: str) -> dict | None:
    targets = httpx.get(f"{router_url}/status", timeout=10).json()["targets"]
    return next((t for t in targets if t["url"] == url), None)


def _state(router_url: str, url: str) -> str | None:
    target = _target(router_url, url)
    return None if target is None else target["state"]


def _load(router_url: str, url: str) -> int:
    target = _target(router_url, url)
    return 0 if target is None else target["load"]["in_flight"]
