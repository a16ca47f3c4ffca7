"""Whether a CUDA graph can hold a model's TP all-reduce (what decides, with a GPU, whether its
forwards are captured), and the orderings the shared-GPU all-reduce accepts. The orderings
themselves run in test_shared_reduce_gpu.py."""

import pytest
import torch

from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.shared_reduce import SharedDeviceAllReduce
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection


class Reduce:
    def __init__(self, capturable: bool) -> None:
        self.capturable = capturable

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("capturable", [True, False])
def test_a_shared_all_reduce_says_whether_a_graph_can_hold_it(capturable):
    config = ModelSection().model_config()
    weights = full_weights(config, None, seed=0)
    model = Model(config, weights, tp_size=2, tp_rank=1, all_reduce=Reduce(capturable))
    assert model.reduce_capturable is capturable
    assert Model(config, weights).reduce_capturable  # TP1: nothing to reduce


def test_an_unknown_ordering_is_refused_by_name():
    with pytest.raises(ValueError, match="not 'sideways'"):
        SharedDeviceAllReduce(None, 0, 2, torch.device("cpu"), 16, torch.float32, None, "sideways")
