import msgspec
import pytest

from kvferry.staging.layout import KVLayout

BASE = dict(
    model="llama-3-8b", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", page_size=16
)


def test_per_rank_bytes():
    layout = KVLayout(**BASE, tp_size=4, tp_rank=3)
    assert layout.heads == range(6, 8)
    assert layout.slot_bytes == 2 * 128 * 2
    assert layout.bytes_per_token == 64 * 512


def test_replicated_and_mla_ranks_hold_one_head():
    assert KVLayout(**{**BASE, "num_kv_heads": 2}, tp_size=8, tp_rank=5).heads == range(1, 2)
    mla = KVLayout(**{**BASE, "num_kv_heads": 1, "head_dim": 576}, mla=True, tp_size=8, tp_rank=7)
    assert (mla.num_planes, mla.bytes_per_token) == (32, 32 * 576 * 2)


def test_compat_hash_ignores_page_size_and_tp():
    a = KVLayout(**BASE, tp_size=2, tp_rank=1)
    b = KVLayout(**{**BASE, "page_size": 64})
    assert a.compat_hash == b.compat_hash and a.mismatch(b) is None
    assert len(a.compat_hash) == 16


@pytest.mark.parametrize(
    "field, value",
    [
        ("dtype", "float16"),
        ("head_dim", 64),
        ("num_kv_heads", 4),
        ("num_layers", 16),
        ("model", "x"),
    ],
)
def test_mismatch_names_the_field(field, value):
    a = KVLayout(**BASE)
    b = KVLayout(**{**BASE, field: value})
    assert a.compat_hash != b.compat_hash
    assert a.mismatch(b).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"tp_size": 3}, "tp_size=3"),
        ({"dtype": "float64"}, "float64"),
        ({"tp_rank": 1}, "tp_rank=1"),
        ({"head_dim": 0}, "head_dim=0"),
        ({"mla": True}, "num_kv_heads=8"),
        ({"tp_size": 1 << 20, "tp_rank": 0}, "tp_size=1048576 must be in \\[1, 1024\\]"),
        ({"num_layers": 1 << 20}, "num_layers=1048576"),
        ({"head_dim": 1 << 20}, "head_dim=1048576"),
        ({"page_size": 1 << 30}, "page_size=1073741824"),
    ],
)
def test_invalid_layouts(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        KVLayout(**{**BASE, **changes})


def test_round_trips_through_msgpack_and_validates_on_decode():
    layout = KVLayout(**BASE, tp_size=2, tp_rank=1)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(layout), type=KVLayout) == layout
    bad = msgspec.msgpack.encode({**BASE, "tp_size": 3})
    with pytest.raises(msgspec.ValidationError, match="tp_size=3"):
        msgspec.msgpack.decode(bad, type=KVLayout)
