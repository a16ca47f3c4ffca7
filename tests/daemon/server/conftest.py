import pytest

from support.cluster import decode, prefill, running, write


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """prefill-0 -> decode-0, the embedded random model; one per test module."""
    p = prefill("prefill-0")
    path = write(tmp_path_factory.mktemp("pair"), [p, decode("decode-0", [p])])
    with running(path) as launcher:
        yield launcher
