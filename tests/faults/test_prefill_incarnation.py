"""A prefill daemon restarted on its address while the decode rank has no room on it: nothing of
the old one is lost on decode (no room to fail; the decode rank's control socket to it closed
as idle, stood in for here by ranks that do not watch their connections), yet the very next
requests go to the new ranks, because the decode daemon's probe sees the new incarnation and
tells its ranks before it routes a request there again."""

from __future__ import annotations

import pytest

from kvferry.daemon.server.api import CompletionRequest
from support.cluster import client, wait_for, wait_idle
from support.matrix_cluster import matrix_cluster

PROMPTS = [[3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [42] * 20]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with matrix_cluster(tmp_path_factory.mktemp("incarnation"), unwatched=True) as launcher:
        yield launcher


def _prefill(launcher) -> dict:
    return client(launcher, "decode-0").status()["prefill"][0]


def test_the_next_requests_after_a_prefill_restart_reach_its_new_ranks(cluster):
    decoder = client(cluster, "decode-0")
    assert decoder.complete(CompletionRequest(prompt=PROMPTS[0], max_tokens=4)).token_ids
    wait_idle(cluster)  # the decode rank caches the prefill's ranks and holds no room there
    old = _prefill(cluster)["incarnation"]
    assert old is not None
    cluster.restart("prefill-0", 180)

    def new_and_chosen() -> bool:
        prefill = _prefill(cluster)
        seen = prefill["incarnation"] not in (None, old)
        return seen and prefill["reachable"] and not prefill["backing_off"]

    wait_for(new_and_chosen, "decode to see the new incarnation", 60)
    for prompt in PROMPTS:  # a peer_lost (the old ranks' addresses) would raise ClientError
        assert decoder.complete(CompletionRequest(prompt=prompt, max_tokens=4)).token_ids
    wait_idle(cluster)
