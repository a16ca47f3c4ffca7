"""kvferry.staging: KV layouts and head-slice plans, the ring allocator, staging buffers, and
gather/scatter between paged KV caches and contiguous staging regions."""

from kvferry.staging.buffer import StagingBuffer
from kvferry.staging.kv_copy import KVPlanes, gather, scatter
from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import HeadSlice, plan_head_transfers, rank_heads
from kvferry.staging.ring import RingAllocator
from kvferry.staging.slots import token_slots

__all__ = [
    "HeadSlice",
    "KVLayout",
    "KVPlanes",
    "RingAllocator",
    "StagingBuffer",
    "gather",
    "plan_head_transfers",
    "rank_heads",
    "scatter",
    "token_slots",
]
