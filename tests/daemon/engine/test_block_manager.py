import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.model.tokenizer import ByteTokenizer


def test_grow_and_release():
    bm = BlockManager(num_pages=4, page_size=4)
    assert bm.allocate(1, 5) == [0, 1]
    assert bm.can_allocate(1, 8) and bm.allocate(1, 8) == [0, 1]
    assert bm.slots(1, 3, 3).tolist() == [3, 4, 5]
    assert not bm.can_allocate(2, 9)
    with pytest.raises(MemoryError, match="needs 3 more pages, 2 are free"):
        bm.allocate(2, 9)
    bm.deallocate(1)
    bm.deallocate(1)  # idempotent
    assert bm.free_pages == 4
    bm.check()


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), st.booleans()), max_size=60))
def test_pages_are_never_shared_or_lost(ops):
    bm = BlockManager(num_pages=16, page_size=4)
    for seq, tokens, free in ops:
        if free:
            bm.deallocate(seq)
        elif bm.can_allocate(seq, tokens):
            bm.allocate(seq, tokens)
        bm.check()
    for seq in range(6):
        bm.deallocate(seq)
    assert bm.free_pages == 16


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert max(ids) < 256 and tok.decode([*ids, tok.eos_id]) == "héllo ✓"
