from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockMeta(_message.Message):
    __slots__ = ("size", "dtype", "shape", "layout", "codec", "raw_size", "checksum")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    size: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: str
    codec: str
    raw_size: int
    checksum: int
    def __init__(self, size: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[str] = ..., codec: _Optional[str] = ..., raw_size: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class BlockHeader(_message.Message):
    __slots__ = ("key", "meta")
    KEY_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    meta: BlockMeta
    def __init__(self, key: _Optional[bytes] = ..., meta: _Optional[_Union[BlockMeta, _Mapping]] = ...) -> None: ...

class BlockHeaders(_message.Message):
    __slots__ = ("blocks", "truncated", "durable")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockHeader]
    truncated: bool
    durable: bool
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockHeader, _Mapping]]] = ..., truncated: _Optional[bool] = ..., durable: _Optional[bool] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("headers", "data")
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    headers: BlockHeaders
    data: bytes
    def __init__(self, headers: _Optional[_Union[BlockHeaders, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored", "existed")
    STORED_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    existed: int
    def __init__(self, stored: _Optional[int] = ..., existed: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "wait_ms", "fetch")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    wait_ms: int
    fetch: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., wait_ms: _Optional[int] = ..., fetch: _Optional[bool] = ...) -> None: ...

class PrefetchReply(_message.Message):
    __slots__ = ("present", "started")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    present: int
    started: bool
    def __init__(self, present: _Optional[int] = ..., started: _Optional[bool] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("headers", "data")
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    headers: BlockHeaders
    data: bytes
    def __init__(self, headers: _Optional[_Union[BlockHeaders, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TokenPrefix(_message.Message):
    __slots__ = ("token_ids", "block_size", "salt")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    salt: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ..., salt: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys", "tokens")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    keys: GetRequest
    tokens: TokenPrefix
    def __init__(self, keys: _Optional[_Union[GetRequest, _Mapping]] = ..., tokens: _Optional[_Union[TokenPrefix, _Mapping]] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("found", "tiers")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    found: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, found: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "blocks", "bytes", "capacity", "hits", "misses", "evictions", "demotions", "promotions", "errors", "last_error", "payload_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    blocks: int
    bytes: int
    capacity: int
    hits: int
    misses: int
    evictions: int
    demotions: int
    promotions: int
    errors: int
    last_error: str
    payload_bytes: int
    def __init__(self, name: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., capacity: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., demotions: _Optional[int] = ..., promotions: _Optional[int] = ..., errors: _Optional[int] = ..., last_error: _Optional[str] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("tiers", "puts", "gets", "lookups", "uptime_s", "transfers", "fetched_blocks", "fetched_bytes", "tenant", "tenant_blocks", "tenant_bytes", "quota")
    class TransfersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FetchedBlocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FetchedBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TENANT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    puts: int
    gets: int
    lookups: int
    uptime_s: float
    transfers: _containers.ScalarMap[str, int]
    fetched_blocks: _containers.ScalarMap[str, int]
    fetched_bytes: _containers.ScalarMap[str, int]
    tenant: str
    tenant_blocks: int
    tenant_bytes: int
    quota: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., puts: _Optional[int] = ..., gets: _Optional[int] = ..., lookups: _Optional[int] = ..., uptime_s: _Optional[float] = ..., transfers: _Optional[_Mapping[str, int]] = ..., fetched_blocks: _Optional[_Mapping[str, int]] = ..., fetched_bytes: _Optional[_Mapping[str, int]] = ..., tenant: _Optional[str] = ..., tenant_blocks: _Optional[int] = ..., tenant_bytes: _Optional[int] = ..., quota: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "data_address", "unix_address", "ticket", "ticket_ttl_s", "capacity", "host_capacity", "max_block_size", "max_blocks", "instance", "proof", "nixl")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UNIX_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TICKET_TTL_S_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HOST_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    NIXL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    data_address: str
    unix_address: str
    ticket: bytes
    ticket_ttl_s: float
    capacity: int
    host_capacity: int
    max_block_size: int
    max_blocks: int
    instance: str
    proof: bytes
    nixl: bool
    def __init__(self, node_id: _Optional[str] = ..., data_address: _Optional[str] = ..., unix_address: _Optional[str] = ..., ticket: _Optional[bytes] = ..., ticket_ttl_s: _Optional[float] = ..., capacity: _Optional[int] = ..., host_capacity: _Optional[int] = ..., max_block_size: _Optional[int] = ..., max_blocks: _Optional[int] = ..., instance: _Optional[str] = ..., proof: _Optional[bytes] = ..., nixl: _Optional[bool] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("inflight", "bytes_per_s")
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    inflight: int
    bytes_per_s: float
    def __init__(self, inflight: _Optional[int] = ..., bytes_per_s: _Optional[float] = ...) -> None: ...

class NodeLocation(_message.Message):
    __slots__ = ("node_id", "address", "data_address", "matched", "tiers", "load", "score")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    data_address: str
    matched: int
    tiers: _containers.ScalarMap[str, int]
    load: NodeLoad
    score: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., data_address: _Optional[str] = ..., matched: _Optional[int] = ..., tiers: _Optional[_Mapping[str, int]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class LocateReply(_message.Message):
    __slots__ = ("nodes", "local_only")
    NODES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeLocation]
    local_only: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeLocation, _Mapping]]] = ..., local_only: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("from_sequence",)
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    from_sequence: int
    def __init__(self, from_sequence: _Optional[int] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("sequence", "payload", "node_id", "instance")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    payload: bytes
    node_id: str
    instance: str
    def __init__(self, sequence: _Optional[int] = ..., payload: _Optional[bytes] = ..., node_id: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class GetAnswer(_message.Message):
    __slots__ = ("blocks", "truncated", "lease", "offsets", "expires_in_s", "inline")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockHeader]
    truncated: bool
    lease: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    expires_in_s: float
    inline: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockHeader, _Mapping]]] = ..., truncated: _Optional[bool] = ..., lease: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ..., expires_in_s: _Optional[float] = ..., inline: _Optional[_Iterable[int]] = ...) -> None: ...

class PutAnswer(_message.Message):
    __slots__ = ("present", "put", "offsets", "expires_in_s")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[int]
    put: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    expires_in_s: float
    def __init__(self, present: _Optional[_Iterable[int]] = ..., put: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class Leases(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("put", "checksums", "hash_here")
    PUT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    HASH_HERE_FIELD_NUMBER: _ClassVar[int]
    put: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    hash_here: bool
    def __init__(self, put: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ..., hash_here: _Optional[bool] = ...) -> None: ...

class NixlRegion(_message.Message):
    __slots__ = ("addr", "size", "vram", "device")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VRAM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    addr: int
    size: int
    vram: bool
    device: int
    def __init__(self, addr: _Optional[int] = ..., size: _Optional[int] = ..., vram: _Optional[bool] = ..., device: _Optional[int] = ...) -> None: ...

class NixlSession(_message.Message):
    __slots__ = ("session", "metadata", "regions")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    session: int
    metadata: bytes
    regions: _containers.RepeatedCompositeFieldContainer[NixlRegion]
    def __init__(self, session: _Optional[int] = ..., metadata: _Optional[bytes] = ..., regions: _Optional[_Iterable[_Union[NixlRegion, _Mapping]]] = ...) -> None: ...

class NixlSessionReply(_message.Message):
    __slots__ = ("session", "agent")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    session: int
    agent: str
    def __init__(self, session: _Optional[int] = ..., agent: _Optional[str] = ...) -> None: ...

class NixlGet(_message.Message):
    __slots__ = ("ask", "session", "into")
    ASK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    INTO_FIELD_NUMBER: _ClassVar[int]
    ask: GetRequest
    session: int
    into: NixlRegion
    def __init__(self, ask: _Optional[_Union[GetRequest, _Mapping]] = ..., session: _Optional[int] = ..., into: _Optional[_Union[NixlRegion, _Mapping]] = ...) -> None: ...

class NixlPlaces(_message.Message):
    __slots__ = ("addrs", "vram", "device")
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    VRAM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    addrs: _containers.RepeatedScalarFieldContainer[int]
    vram: bool
    device: int
    def __init__(self, addrs: _Optional[_Iterable[int]] = ..., vram: _Optional[bool] = ..., device: _Optional[int] = ...) -> None: ...

class NixlPut(_message.Message):
    __slots__ = ("headers", "session", "addrs", "vram", "device")
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    VRAM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    headers: BlockHeaders
    session: int
    addrs: _containers.RepeatedScalarFieldContainer[int]
    vram: bool
    device: int
    def __init__(self, headers: _Optional[_Union[BlockHeaders, _Mapping]] = ..., session: _Optional[int] = ..., addrs: _Optional[_Iterable[int]] = ..., vram: _Optional[bool] = ..., device: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("keys", "target", "transport")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    target: str
    transport: str
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., target: _Optional[str] = ..., transport: _Optional[str] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("found", "stored", "existed")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    found: int
    stored: int
    existed: int
    def __init__(self, found: _Optional[int] = ..., stored: _Optional[int] = ..., existed: _Optional[int] = ...) -> None: ...
