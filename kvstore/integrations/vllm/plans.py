"""What the scheduler side tells the workers each step (pickled into their process), and what
the workers report back: KV events and counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents, KVEventAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class LoadPlan:
    """Load the blocks a request found in kvstore into its pages."""

    req_id: str
    keys: list[list[bytes]]  # per tensor-parallel rank: the blocks' keys, in token order
    block_ids: list[int]  # the vLLM block each goes to, in the same order
    is_async: bool  # the request waits outside the batch until the load is reported
    wait_s: float = 0.0  # for blocks its producer is still saving (they were promised)
    fetch: bool = False  # through this node from the cluster's other nodes


@dataclass
class SavePlan:
    """Save the blocks a request completed this step, and say so in vLLM's event stream."""

    req_id: str
    keys: list[list[bytes]]
    block_ids: list[int]
    hashes: list[Any]  # vLLM's own hashes of these blocks, as its KV events carry them
    parent: Any  # vLLM's hash of the block before the first, None at the prompt's start
    token_ids: list[int]


@dataclass
class KVStoreMetadata(KVConnectorMetadata):
    loads: list[LoadPlan] = field(default_factory=list)
    saves: list[SavePlan] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)  # their pages may be reused this step


class KVStoreEvents(KVConnectorKVEvents):
    """Worker events on their way to the scheduler: with tensor parallelism, a block is
    reported once every rank has stored its part (vLLM's own aggregator)."""

    def __init__(self, num_workers: int = 1) -> None:
        self._events = KVEventAggregator(num_workers)

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.add_events(events)

    def aggregate(self) -> KVStoreEvents:
        common = self._events.get_common_events()
        self._events.clear_events()
        self._events.add_events(common)
        self._events.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._events.increment_workers(count)

    def get_all_events(self) -> list[KVCacheEvent]:
        return self._events.get_all_events()

    def get_number_of_workers(self) -> int:
        return self._events.get_number_of_workers()

    def clear_events(self) -> None:
        self._events.clear_events()
        self._events.reset_workers()


@dataclass
class KVStoreStats(KVConnectorStats):
    """Counters since the last report (vLLM logs them as "KV Transfer metrics")."""

    def add(self, counts: Counter) -> None:
        for name, value in counts.items():
            self.data[name] = self.data.get(name, 0) + value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVStoreStats:
        self.add(Counter(other.data))
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(sorted(self.data.items()))

    def is_empty(self) -> bool:
        return not any(self.data.values())
