"""KV layout of one rank: what its paged cache holds and how peers check they agree."""

from __future__ import annotations

import hashlib

import msgspec

from kvferry.staging.plan import check_tp, rank_heads

# Bytes per element of every KV dtype the copy paths move (they copy bytes, never convert).
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "int8": 1,
    "uint8": 1,
}

# Bounds on every size field: a layout may come from a peer, and planning and checking work
# grows with these (planning loops over every rank); anything past them is refused on decode.
MAX_TP_SIZE = 1024
MAX_KV_HEADS = 1024
MAX_LAYERS = 1024
MAX_HEAD_DIM = 4096
MAX_PAGE_SIZE = 1 << 16
_BOUNDS = {
    "num_layers": MAX_LAYERS,
    "num_kv_heads": MAX_KV_HEADS,
    "head_dim": MAX_HEAD_DIM,
    "page_size": MAX_PAGE_SIZE,
    "tp_size": MAX_TP_SIZE,
}

# The fields two sides must agree on to exchange KV; page size and TP layout may differ.
COMPAT_FIELDS = ("model", "dtype", "head_dim", "num_kv_heads", "num_layers", "mla")


def layer_groups(num_layers: int, group: int, taper: bool = False) -> list[range]:
    """The layers of each transfer message of a chunk: [0, group), [group, 2 * group), ...;
    group 0 (or at least num_layers) keeps every layer in one message (whole-chunk mode).

    `taper` splits the last group in halves down to one layer (16 layers in groups of 4:
    [0, 4), [4, 8), [8, 12), [12, 14), [14, 15), [15, 16)). What is left to move once the
    forward has ended is then one layer's KV instead of a group's, for two or three messages
    more a chunk: the earlier, larger groups travel while the later layers compute."""
    if group < 0:
        raise ValueError(f"layer_group={group} must be >= 0")
    if group == 0 or group >= num_layers:
        return [range(num_layers)]
    groups = [range(start, min(start + group, num_layers)) for start in range(0, num_layers, group)]
    if not taper:
        return groups
    last = groups.pop()
    start = last.start
    while start < last.stop:
        size = (last.stop - start + 1) // 2
        groups.append(range(start, start + size))
        start += size
    return groups


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """The KV cache of one TP rank.

    Per layer the cache is K and V planes of shape [slots, local_heads, head_dim]
    (slots = pages * page_size); an MLA cache has one latent plane per layer instead.
    `num_kv_heads` counts the model's heads, not this rank's share.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    tp_size: int = 1
    tp_rank: int = 0
    mla: bool = False

    def __post_init__(self) -> None:
        for name, bound in _BOUNDS.items():
            if not 1 <= getattr(self, name) <= bound:
                raise ValueError(f"{name}={getattr(self, name)} must be in [1, {bound}]")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.mla and self.num_kv_heads != 1:
            raise ValueError(
                f"an MLA cache has one latent head, got num_kv_heads={self.num_kv_heads}"
            )
        if not self.mla:
            check_tp(self.num_kv_heads, self.tp_size)
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} is outside tp_size={self.tp_size}")

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def num_planes(self) -> int:
        """Cache planes per rank: K and V per layer, or one latent plane per layer for MLA."""
        return self.num_layers * (1 if self.mla else 2)

    @property
    def heads(self) -> range:
        """The global heads this rank holds."""
        if self.mla:
            return range(1)
        return rank_heads(self.num_kv_heads, self.tp_size, self.tp_rank)

    @property
    def local_heads(self) -> int:
        return len(self.heads)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one token in one plane of this rank's cache."""
        return self.local_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token across all planes of this rank's cache."""
        return self.num_planes * self.slot_bytes

    @property
    def compat_hash(self) -> str:
        """A stable digest of the fields two sides must share (see COMPAT_FIELDS)."""
        key = msgspec.json.encode([getattr(self, name) for name in COMPAT_FIELDS])
        return hashlib.blake2b(key, digest_size=8).hexdigest()

    def mismatch(self, peer: KVLayout) -> str | None:
        """Name the first field on which `peer` cannot exchange KV with this layout, or None."""
        for name in COMPAT_FIELDS:
            mine, theirs = getattr(self, name), getattr(peer, name)
            if mine != theirs:
                return f"{name}: {mine!r} here vs {theirs!r} at peer"
        return None
