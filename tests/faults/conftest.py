import pytest

from support.matrix_cluster import matrix_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """prefill-0 (TP1) -> decode-0 (TP1), the stage holds patched in; one per module."""
    with matrix_cluster(tmp_path_factory.mktemp("matrix")) as launcher:
        yield launcher
