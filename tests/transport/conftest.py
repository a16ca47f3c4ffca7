import pytest

from support.transfer_sim import Deployment


@pytest.fixture
def deployments():
    """Makes transfer_sim Deployments (prefill and decode agents over loopback); closes them."""
    made = []
    yield lambda *a, **kw: made.append(Deployment(*a, **kw)) or made[-1]
    for dep in made:
        dep.close()
