"""What calls return, as plain values: the node's engine builds them and the client
returns the same types, so importing them loads nothing of the node (no tiers, store,
cluster index or event stream)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore.events.schema import KVCacheEvent


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: int
    existed: int

    def __add__(self, other: PutResult) -> PutResult:
        return PutResult(self.stored + other.stored, self.existed + other.existed)


@dataclass(frozen=True, slots=True)
class PushResult:
    found: int  # leading keys the pushing node held and sent
    stored: int  # newly stored at the target
    existed: int  # already at the target


@dataclass(slots=True)
class TierStats:
    name: str
    blocks: int = 0
    bytes: int = 0  # of capacity the blocks take: slots or records, with their metadata
    capacity: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    errors: int = 0  # failed writes, corrupt or unreadable blocks
    last_error: str = ""
    payload_bytes: int = 0  # of the payloads themselves, as stored (encoded)

    def snapshot(self) -> TierStats:
        """A copy that later counting leaves alone (the tier holds its lock)."""
        return replace(self)


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    puts: int
    gets: int
    lookups: int
    uptime_s: float
    transfers: dict[str, int] = field(default_factory=dict)  # by "put/PATH"; filled by the server
    fallbacks: dict[str, int] = field(default_factory=dict)  # paths a client left; by the client
    fetched_blocks: dict[str, int] = field(default_factory=dict)  # pulled from other nodes, by id
    fetched_bytes: dict[str, int] = field(default_factory=dict)
    tenant: str = ""  # with tenants: the caller's, and its own usage and quota (0: none)
    tenant_blocks: int = 0
    tenant_bytes: int = 0
    quota: int = 0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node says of itself (gRPC `Hello`)."""

    node_id: str  # its id in the cluster: the same over restarts
    instance: str  # this run of the daemon: a restart is another
    data_address: str
    unix_address: str
    capacity: int  # bytes of all its tiers
    host_capacity: int
    max_block_size: int
    max_blocks: int  # keys or blocks in one request
    nixl: bool = False  # it moves payloads through NIXL too


@dataclass(frozen=True, slots=True)
class Load:
    inflight: int = 0  # transfers in progress
    bytes_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Location:
    """One node's share of a prompt: `matched` leading blocks, `tiers` of them per tier."""

    node_id: str
    address: str
    data_address: str
    matched: int
    tiers: Mapping[str, int]
    load: Load
    score: float = 0.0


@dataclass(frozen=True)
class Batch:
    """One sealed batch of KV events. Its payload is encoded on first use; every reader
    gets those bytes."""

    sequence: int
    ts: float
    events: tuple[KVCacheEvent, ...]
    data_parallel_rank: int | None = 0
    key_count: int = field(default=0, compare=False)

    @cached_property
    def payload(self) -> bytes:
        """The msgpack bytes vLLM would publish for this batch."""
        from kvstore.events.schema import encode_batch  # the node's side: loaded where used

        return encode_batch(self.ts, list(self.events), self.data_parallel_rank)
