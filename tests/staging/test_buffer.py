import pytest
import torch

from kvferry.staging.buffer import StagingBuffer


def test_regions_are_views_of_one_buffer():
    buf = StagingBuffer(4096)
    buf.storage.zero_()
    a, b = buf.alloc(100), buf.alloc(300)
    assert (a, b) == (0, 256)
    buf.view(b, 300).fill_(7)
    assert buf.storage[256:556].eq(7).all()
    assert buf.storage[:256].ne(7).all() and buf.storage[556:].ne(7).all()
    view = buf.view(b, 300)
    assert view.data_ptr() == buf.address + 256
    as_words = buf.view(a, 96, torch.float32)
    assert as_words.shape == (24,) and as_words.data_ptr() == buf.address
    buf.free(a)
    buf.free(b)
    assert buf.ring.used_bytes == 0


def test_a_region_describes_its_bytes_and_views_them():
    buf = StagingBuffer(4096)
    buf.storage.zero_()
    region = buf.region(256, 300)
    assert (region.data_ptr(), region.numel(), region.element_size()) == (buf.address + 256, 300, 1)
    assert region.nbytes == 300 and region.is_contiguous() and region.device == buf.device
    region.view().fill_(7)
    assert buf.storage[256:556].eq(7).all() and buf.storage[:256].eq(0).all()
    assert region.view(torch.int32).shape == (75,)
    with pytest.raises(ValueError, match=r"\[4000, 4200\) is outside"):
        buf.region(4000, 200)


@pytest.mark.parametrize(
    "offset, nbytes, dtype, fragment",
    [
        (4000, 200, torch.uint8, r"\[4000, 4200\) is outside"),
        (-1, 4, torch.uint8, "outside"),
        (2, 8, torch.float32, "misaligned for torch.float32"),
        (0, 6, torch.float32, "misaligned"),
    ],
)
def test_peer_supplied_regions_are_checked(offset, nbytes, dtype, fragment):
    with pytest.raises(ValueError, match=fragment):
        StagingBuffer(4096).view(offset, nbytes, dtype)


def test_ring_rules_apply():
    buf = StagingBuffer(1024, alignment=256)
    with pytest.raises(ValueError, match="exceeds ring capacity"):
        buf.alloc(2048)
    assert buf.alloc(1024) == 0 and buf.alloc(1) is None


def test_vmm_needs_a_gpu():
    with pytest.raises(ValueError, match="vmm=True needs a CUDA device"):
        StagingBuffer(1024, "cpu", vmm=True)
