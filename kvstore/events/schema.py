"""vLLM's KV event schema, as vLLM 0.32.0 defines it in `vllm/distributed/kv_events.py`.

Field names, order, defaults and struct options are the wire format: msgspec writes a batch as
the array `[ts, events, data_parallel_rank]` and each event as a map whose first key `"type"`
holds the class name, then every field in declaration order, less those equal to their default.
Change nothing here without checking vLLM's file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from kvstore.tiers.registry import TIER_REGISTRY

BlockHash = bytes | int  # vLLM's ExternalBlockHash

# vLLM's mediums are MEDIUM_GPU, MEDIUM_CPU and MEDIUM_STORAGE; other tiers are upper-cased.
MEDIUMS: Mapping[str, str] = {tier.name: tier.medium for tier in TIER_REGISTRY}


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the three events; `tag=True` writes the class name under `"type"`."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def encode_batch(ts: float, events: list[KVCacheEvent], data_parallel_rank: int | None) -> bytes:
    """The msgpack payload vLLM would publish for these events."""
    return msgspec.msgpack.encode(EventBatch(ts, events, data_parallel_rank))


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode a payload, ours or a vLLM engine's; fields newer than 0.32.0 are ignored."""
    return msgspec.msgpack.decode(payload, type=KVEventBatch)


def wire_hash(key: bytes, as_int: bool) -> BlockHash:
    """A key as vLLM sends a hash: the bytes, or (as_int) the integer of the last 8, big-endian.

    vLLM's int form (its default, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`) is
    `int.from_bytes(hash, "big") & (2**64 - 1)`: the same number, and the one llm-d derives
    from a bytes hash, so both forms name a block alike to a 64-bit index.
    """
    return int.from_bytes(key[-8:], "big") if as_int else bytes(key)
