"""A rank's forwards run on a stream of the highest priority, above its copy streams
(`engine.high_priority_forwards`), or on the device's default stream."""

import threading

import pytest
import torch

from kvferry.daemon.server.config import DaemonConfig, EngineSection
from kvferry.daemon.server.rank_setup import rank_device
from kvferry.staging.copy_stream import CopyStream

pytestmark = pytest.mark.gpu


def in_thread(function):
    """`function()` on a thread of its own (a current stream is the thread's)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=function()))
    thread.start()
    thread.join(60)
    return result["value"]


@pytest.mark.parametrize("high", [True, False])
def test_forward_stream_priority(high):
    engine = EngineSection(high_priority_forwards=high)
    config = DaemonConfig(role="prefill", device="cuda", engine=engine)

    def priorities():
        device = rank_device(config, 0)
        copies = CopyStream(device)
        try:
            current = torch.cuda.current_stream(device)
            return current.priority, copies._stream.priority, current == torch.cuda.default_stream()
        finally:
            copies.close()

    forward, copy, default = in_thread(priorities)
    if high:
        assert forward < copy  # a lower number is a higher priority
        assert not default
    else:
        assert default and forward == copy
