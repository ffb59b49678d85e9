"""A node's KV event stream on vLLM's wire format, so that vLLM-aware routers read it unchanged.

The daemon reports what its tiers gain and lose to one `EventLog`:

    events = EventLog(block_size=256)
    publisher = ZmqPublisher(events, "tcp://*:5557", "tcp://*:5558", topic="kv@node-a@model")
    events.stored(keys, "host")         # after a put commits, or a promotion lands
    events.removed(keys, "host")        # after an eviction, a demotion away, or a delete
    for batch in events.watch(from_sequence):   # behind the gRPC Watch stream
        ...

The log seals events into batches with gap-free sequence numbers and keeps the newest for
replay; the publisher sends each batch as vLLM 0.32.0's `ZmqEventPublisher` does (PUB frames
topic, 8-byte big-endian sequence, msgpack payload; ROUTER replay ending in sequence -1).
Both read one ring, so a batch has one sequence and one payload whichever way it leaves.
"""

from kvstore.events.log import Batch, EventLog, SequenceTooOld, Watch
from kvstore.events.publisher import END_SEQ, ZmqPublisher
from kvstore.events.schema import (
    MEDIUMS,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVCacheEvent,
    KVEventBatch,
    decode_batch,
    encode_batch,
    wire_hash,
)

__all__ = [
    "END_SEQ",
    "MEDIUMS",
    "AllBlocksCleared",
    "Batch",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventLog",
    "KVCacheEvent",
    "KVEventBatch",
    "SequenceTooOld",
    "Watch",
    "ZmqPublisher",
    "decode_batch",
    "encode_batch",
    "wire_hash",
]
