"""Gather KV head slices from a paged cache into staging, and scatter them back out.

Staging layout of one (chunk, destination) region: [plane][token][head][head_dim], planes being
K of every layer then V of every layer (or one latent plane per layer for MLA), tokens in the
chunk's order. The two sides may therefore use different page sizes.

Three paths produce bit-identical bytes: RawKernels (cuda/kv_copy.cu) for caches on a GPU,
native code for caches in host memory (host_copy.c), and torch indexing where that cannot be
built. Token slots and head ranges are validated on the host before anything is written, since
they derive from what a peer sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvferry.staging.host_copy import host_copy, library

BACKENDS = ("auto", "torch", "cuda", "host")
# Same-size integer dtypes: the torch path moves bits, so NaN payloads and fp8 survive unchanged.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class KVPlanes:
    """The cache planes one rank gathers from or scatters into, each [slots, heads, head_dim].

    Order: K of layers 0..L-1, then V of layers 0..L-1 (latent planes only for MLA).
    """

    def __init__(self, planes: Sequence[torch.Tensor]) -> None:
        if not planes:
            raise ValueError("KVPlanes needs at least one cache plane")
        first = planes[0]
        for i, plane in enumerate(planes):
            if plane.dim() != 3 or not plane.is_contiguous():
                raise ValueError(f"plane {i} must be a contiguous [slots, heads, head_dim] tensor")
            if (plane.shape, plane.dtype, plane.device) != (first.shape, first.dtype, first.device):
                raise ValueError(
                    f"plane {i} is {tuple(plane.shape)} {plane.dtype} on {plane.device}, "
                    f"plane 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
                )
        self.planes = list(planes)
        self.num_slots, self.num_heads, self.head_dim = first.shape
        self.dtype = first.dtype
        self.device = first.device
        self._pointers: torch.Tensor | None = None
        self._subsets: dict[tuple[int, int], KVPlanes] = {}
        # Largest power of two (<= 16) dividing every plane's address: bounds the vector width.
        self.address_alignment = 16
        for plane in self.planes:
            while plane.data_ptr() % self.address_alignment:
                self.address_alignment //= 2

    @classmethod
    def from_cache(cls, cache: torch.Tensor) -> KVPlanes:
        """Planes of one tensor [num_planes, slots, heads, head_dim]."""
        return cls(list(cache.unbind(0)))

    @property
    def num_planes(self) -> int:
        return len(self.planes)

    def layers(self, layers: range, num_layers: int) -> KVPlanes:
        """The planes of `layers` only (K of each, then V of each), in the same order: what one
        layer-group message carries. Built once per range; all layers is this object."""
        per_layer, rest = divmod(self.num_planes, num_layers)
        if rest or per_layer < 1:
            raise ValueError(f"{self.num_planes} planes do not split into {num_layers} layers")
        if not (0 <= layers.start < layers.stop <= num_layers and layers.step == 1):
            raise ValueError(f"layers {layers} are outside a model of {num_layers} layers")
        if len(layers) == num_layers:
            return self
        key = (layers.start, layers.stop)
        if key not in self._subsets:
            self._subsets[key] = KVPlanes(
                [self.planes[kind * num_layers + i] for kind in range(per_layer) for i in layers]
            )
        return self._subsets[key]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def pointers(self) -> torch.Tensor:
        """[num_planes] uint64 plane addresses on the planes' device, built once."""
        if self._pointers is None:
            addresses = [plane.data_ptr() for plane in self.planes]
            self._pointers = torch.tensor(addresses, dtype=torch.uint64).to(self.device)
        return self._pointers

    def staging_shape(self, num_tokens: int, num_heads: int) -> tuple[int, int, int, int]:
        return (self.num_planes, num_tokens, num_heads, self.head_dim)

    def row_bytes(self, head_start: int, num_heads: int) -> tuple[int, int, int]:
        """(bytes of one token's heads [head_start, +num_heads) in a plane, bytes of one slot,
        offset of head_start in a slot): what a copy kernel's row lengths are made of."""
        head = self.head_dim * self.itemsize
        return num_heads * head, self.num_heads * head, head_start * head

    def staging_bytes(self, num_tokens: int, num_heads: int) -> int:
        return self.num_planes * num_tokens * num_heads * self.head_dim * self.itemsize

    def check_slice(self, slots: np.ndarray, head_start: int, num_heads: int) -> None:
        """Raise ValueError unless every slot and the head range lie inside this cache."""
        if not head_start >= 0 or num_heads < 1 or head_start + num_heads > self.num_heads:
            raise ValueError(
                f"heads [{head_start}, {head_start + num_heads}) are outside a cache of "
                f"{self.num_heads} heads"
            )
        # one pass: a negative slot read as unsigned is past every cache
        unsigned = slots.astype(np.int64, copy=False).view(np.uint64)
        if slots.size and unsigned.max() >= self.num_slots:
            bad = slots[(slots < 0) | (slots >= self.num_slots)][0]
            raise ValueError(f"token slot {bad} is outside a cache of {self.num_slots} slots")


def host_slots(slots: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """Token slots as a 1-D int64 host array; device tensors are refused (checking would sync)."""
    if isinstance(slots, torch.Tensor):
        if slots.device.type != "cpu":
            raise ValueError(f"token slots must be on the host, got a tensor on {slots.device}")
        slots = slots.numpy()
    array = np.asarray(slots)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"token slots must be a 1-D integer array, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64, copy=False)


def gather(
    planes: KVPlanes,
    slots: torch.Tensor | np.ndarray | Sequence[int],
    head_start: int,
    num_heads: int,
    out: torch.Tensor,
    backend: str = "auto",
    stream: int | None = None,
) -> None:
    """Copy heads [head_start, +num_heads) of `slots` in every plane into `out`.

    `out`: a contiguous tensor (any dtype) or a staging Region of exactly
    staging_bytes(len(slots), num_heads) bytes on the planes' device; it is written as
    [plane][token][head][head_dim].
    On GPU the copy is queued on `stream` (a raw cudaStream_t; the kernel path only), else on
    the current torch stream, and nothing waits for it.
    """
    slots_np = _checked(planes, slots, head_start, num_heads, out)
    path = _path(planes, backend)
    if path == "cuda":
        _launch(planes, slots_np, head_start, num_heads, out, True, stream)
    elif path == "host":
        host_copy(planes, slots_np, head_start, num_heads, out, gather=True)
    else:
        _torch_gather(planes, slots_np, head_start, num_heads, out)


def scatter(
    src: torch.Tensor,
    planes: KVPlanes,
    slots: torch.Tensor | np.ndarray | Sequence[int],
    head_start: int,
    num_heads: int,
    backend: str = "auto",
    stream: int | None = None,
) -> None:
    """The inverse of gather: write staging `src` into heads [head_start, +num_heads) of `slots`."""
    slots_np = _checked(planes, slots, head_start, num_heads, src)
    path = _path(planes, backend)
    if path == "cuda":
        _launch(planes, slots_np, head_start, num_heads, src, False, stream)
    elif path == "host":
        host_copy(planes, slots_np, head_start, num_heads, src, gather=False)
    else:
        _torch_scatter(src, planes, slots_np, head_start, num_heads)


def _checked(planes: KVPlanes, slots, head_start: int, num_heads: int, staging: torch.Tensor):
    slots_np = host_slots(slots)
    planes.check_slice(slots_np, head_start, num_heads)
    expected = planes.staging_bytes(len(slots_np), num_heads)
    nbytes = staging.numel() * staging.element_size()
    if nbytes != expected or not staging.is_contiguous():
        raise ValueError(
            f"staging region holds {nbytes} bytes (contiguous={staging.is_contiguous()}), "
            f"expected a contiguous {expected} for {len(slots_np)} tokens x {num_heads} heads"
        )
    if staging.device != planes.device:
        raise ValueError(f"staging region is on {staging.device}, cache on {planes.device}")
    return slots_np


def _path(planes: KVPlanes, backend: str) -> str:
    """Which copy runs: "cuda" (the kernels), "host" (host_copy.c) or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    on_gpu = planes.device.type == "cuda"
    if backend == "cuda" and not on_gpu:
        raise ValueError(f"backend='cuda' needs a cache on a GPU, got {planes.device}")
    if backend == "host" and (on_gpu or library() is None):
        why = f"a cache on the host, got {planes.device}" if on_gpu else "a C compiler (see log)"
        raise ValueError(f"backend='host' needs {why}")
    if backend == "auto":
        return "cuda" if on_gpu else "host" if library() is not None else "torch"
    return backend


def _staging_view(planes: KVPlanes, staging: torch.Tensor, num_tokens: int, num_heads: int):
    bits = _BITS_DTYPE[planes.itemsize]
    return staging.view(torch.uint8).view(bits).view(planes.staging_shape(num_tokens, num_heads))


# One op per plane, each small enough that torch runs it on the calling thread alone: a transfer
# thread's op over every plane at once went parallel on the CPU (2-13x faster alone, for the
# embedded default's shapes) and took the cores from the next forward (bench/overlap.py:
# whole-chunk TTFT 25 -> 32 ms).
def _torch_gather(planes, slots_np, head_start, num_heads, out) -> None:
    index = torch.from_numpy(slots_np).to(planes.device)
    staged = _staging_view(planes, out, len(slots_np), num_heads)  # [P, T, h, D]
    bits = _BITS_DTYPE[planes.itemsize]
    for plane, dst in zip(planes.planes, staged, strict=True):
        src = plane.view(bits).narrow(1, head_start, num_heads)  # [slots, h, D]
        torch.index_select(src, 0, index, out=dst)


def _torch_scatter(src, planes, slots_np, head_start, num_heads) -> None:
    index = torch.from_numpy(slots_np).to(planes.device)
    staged = _staging_view(planes, src, len(slots_np), num_heads)  # [P, T, h, D]
    bits = _BITS_DTYPE[planes.itemsize]
    for plane, rows in zip(planes.planes, staged, strict=True):
        plane.view(bits).narrow(1, head_start, num_heads).index_copy_(0, index, rows)


def _launch(planes, slots_np, head_start, num_heads, staging, gather: bool, stream) -> None:
    from kvferry.staging.kv_launch import launch_kv_copy  # deferred: needs cupy

    launch_kv_copy(planes, slots_np, head_start, num_heads, staging, gather, stream)
