"""A router with an API key: clients must show it, and the router shows it to its targets (one
key for the deployment)."""

import httpx

from support.router_sim import complete

KEY = "sk-kvferry-test-0123456789"


def test_a_router_asks_the_key_and_shows_it_to_its_targets(stubs, routers, monkeypatch):
    monkeypatch.setenv("KVFERRY_TEST_KEY", KEY)
    (stub,) = stubs(1)
    router = routers([stub.url], api_key_env="KVFERRY_TEST_KEY")
    assert complete(router.url).status_code == 401 and not stub.seen
    body = {"prompt": [1, 2, 3], "max_tokens": 4}
    answer = httpx.post(
        f"{router.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 200 and stub.keys == [f"Bearer {KEY}"]
