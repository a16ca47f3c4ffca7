import pytest

from support.transfer_sim import Deployment
from support.ucx_procs import Proc


@pytest.fixture
def deployments():
    """Makes transfer_sim Deployments (prefill and decode agents over loopback); closes them."""
    made = []
    yield lambda *a, **kw: made.append(Deployment(*a, **kw)) or made[-1]
    for dep in made:
        dep.close()


@pytest.fixture
def procs():
    """Makes sides in child processes over real UCX (support.ucx_procs.Proc); closes them."""
    made = []
    yield lambda *a, **kw: made.append(Proc(*a, **kw)) or made[-1]
    for proc in reversed(made):
        proc.close()
