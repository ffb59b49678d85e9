"""What the sync and async clients share: turning payloads into Put frames,
Get frames back into arrays, and gRPC errors into kvstore exceptions.
No I/O here, so both clients stay a few lines per method.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import grpc
import numpy as np
import xxhash

from kvstore import codecs
from kvstore.errors import (
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from kvstore.keys import BlockKey, check_keys
from kvstore.limits import MAX_BLOCKS
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import data_frames, decode_frame
from kvstore.store import StoreStats
from kvstore.tiers import TierStats

SERVICE = "/kvstore.v1.KVStore/"
UNARY = tuple(
    m.name
    for m in pb.DESCRIPTOR.services_by_name["KVStore"].methods
    if not m.client_streaming and not m.server_streaming
)
HEADERS_PER_FRAME = 4096
ENCODED_PART = 32 << 20
"""Raw bytes per part of an encoded put: one part is sent while the pool encodes the next."""
MAX_MESSAGE = 256 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]

Payload = bytes | bytearray | memoryview | np.ndarray
BYTES = np.dtype(np.uint8)  # what a payload that is not an array encodes as


@dataclass(frozen=True)
class Encoding:
    """How a client encodes what it puts: the codec (see `kvstore.codecs`), the tensor
    layout it records (axis names, e.g. "tokens,layers,kv,heads,dim"), and checksums."""

    codec: str = "none"  # or "auto": resolved per kind of payload by the client
    layout: str = ""
    checksum: bool = False

    def __post_init__(self) -> None:
        if self.codec != "auto":
            codecs.get(self.codec)  # unknown names fail here, in the caller

    def with_overrides(self, codec: str | None, layout: str | None) -> Encoding:
        if codec is None and layout is None:
            return self
        return Encoding(
            self.codec if codec is None else codec,
            self.layout if layout is None else layout,
            self.checksum,
        )


def check_dtype(dtype: np.dtype, field: str) -> None:
    """Payload arrays hold plain numbers (numpy's own or an extension type such as
    bfloat16): an object, structured or void dtype would come back as bytes, not as itself."""
    plain = dtype.kind in "biufc" or (dtype.kind == "V" and dtype.isbuiltin == 2)
    if not plain or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgument(field, f"dtype {dtype} is not a plain numeric dtype")


def as_bytes(payload: Payload) -> tuple[memoryview, str, tuple[int, ...]]:
    """A flat byte view of a payload (no copy when contiguous) and its dtype and shape."""
    if isinstance(payload, np.ndarray):
        array = np.ascontiguousarray(payload)  # copies only a non-contiguous array
        view = memoryview(array.reshape(-1).view(np.uint8))
        return view, codecs.dtype_name(array.dtype), array.shape
    view = memoryview(payload)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view, "", ()


def check_batch(keys: Sequence[BlockKey], payloads: Sequence[Payload]) -> list[BlockKey]:
    """The keys of a put, checked with its payloads; InvalidArgument names what is wrong."""
    if len(payloads) != len(keys):
        raise InvalidArgument("payloads", f"got {len(payloads)} for {len(keys)} keys")
    keys = check_keys(keys, unique=True, limit=len(keys))  # parts split at MAX_BLOCKS
    for i, payload in enumerate(payloads):
        if isinstance(payload, np.ndarray):
            check_dtype(payload.dtype, f"payloads[{i}]")
        elif not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"payloads[{i}]", f"not bytes-like: {type(payload).__name__}")
    return keys


def payload_size(payload: Payload) -> int:
    return payload.nbytes if isinstance(payload, np.ndarray) else memoryview(payload).nbytes


def encoded_parts(
    keys: Sequence[BlockKey],
    payloads: Sequence[Payload],
    encoding: Encoding,
    pool: Executor,
) -> Iterator[tuple[list[pb.BlockHeader], list[memoryview]]]:
    """Headers and flat byte views of a batch, in parts of about `ENCODED_PART` raw bytes.
    With a codec, the pool encodes every block in order and each part is yielded once
    its blocks are done, so a part goes out while the next is encoded. Bad input raises
    before the first part."""
    keys = check_batch(keys, payloads)
    codec = codecs.get(encoding.codec)
    kinds = [
        (p.dtype, p.nbytes) if isinstance(p, np.ndarray) else (BYTES, memoryview(p).nbytes)
        for p in (payloads if codec else ())
    ]
    for dtype, _ in kinds:
        codec.check(dtype)  # every payload, before any part goes out

    def encode(payload: Payload) -> tuple[memoryview, pb.BlockMeta]:
        view, dtype, shape = as_bytes(payload)
        meta = pb.BlockMeta(dtype=dtype, shape=shape, layout=encoding.layout)
        if codec is not None:
            array = payload if isinstance(payload, np.ndarray) else np.frombuffer(view, np.uint8)
            meta.raw_size, meta.codec = len(view), codec.name
            view = memoryview(codec.pack(np.ascontiguousarray(array), encoding.layout))
        meta.size = len(view)
        meta.checksum = xxhash.xxh3_64_intdigest(view) if encoding.checksum else 0
        return view, meta

    def part(first: int, encoded: list[tuple[memoryview, pb.BlockMeta]]):
        headers = [pb.BlockHeader(key=keys[first + i], meta=m) for i, (_, m) in enumerate(encoded)]
        return headers, [view for view, _ in encoded]

    if codec is None:
        for start in range(0, len(payloads), MAX_BLOCKS):
            yield part(start, [encode(p) for p in payloads[start : start + MAX_BLOCKS]])
        return
    futures = [pool.submit(encode, p) for p in payloads]
    try:
        for run in batches([size for _, size in kinds], ENCODED_PART, MAX_BLOCKS):
            yield part(run.start, [f.result() for f in futures[run]])
    finally:
        for future in futures:
            future.cancel()


def batches(sizes: Sequence[int], limit: int, count: int = MAX_BLOCKS) -> Iterator[slice]:
    """Consecutive runs of at most `count` blocks and `limit` bytes (or one block), in order."""
    start = total = 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > limit or i - start >= count):
            yield slice(start, i)
            start, total = i, 0
        total += size
    yield slice(start, len(sizes))


class Decoder:
    """Turns received blocks into the arrays they were put as, decoding in the pool as
    blocks arrive (`arrived`), so decoding overlaps the rest of the transfer."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._done: list[Future | np.ndarray] = []

    def arrived(self, blocks: Sequence[tuple[np.ndarray, pb.BlockMeta]]) -> None:
        for block, meta in blocks:
            encoded = meta.codec not in ("", "none")
            self._done.append(
                self._pool.submit(shaped, block, meta) if encoded else shaped(block, meta)
            )

    def result(self, blocks: Sequence[tuple[np.ndarray, pb.BlockMeta]]) -> list[np.ndarray]:
        """The arrays of all `blocks` of the reply, those not seen yet decoded now."""
        self.arrived(blocks[len(self._done) :])
        return [d.result() if isinstance(d, Future) else d for d in self._done]


def put_frames(
    headers: Sequence[pb.BlockHeader], views: Sequence[memoryview], chunk_size: int
) -> Iterator[bytes]:
    """Header frames for the whole batch, then the payloads as data frames (built lazily,
    as gRPC sends them)."""
    header_frames = [
        pb.PutRequest(
            headers=pb.BlockHeaders(blocks=headers[i : i + HEADERS_PER_FRAME])
        ).SerializeToString()
        for i in range(0, len(headers), HEADERS_PER_FRAME)
    ]
    data = (frame for frame, _ in data_frames(views, chunk_size))
    return itertools.chain(header_frames, data)


def bind(channel: grpc.Channel | grpc.aio.Channel) -> tuple[object, object, dict[str, object]]:
    """The Put and Get stream callables and every unary RPC, all on raw bytes."""
    unary = {name: channel.unary_unary(SERVICE + name) for name in UNARY}
    return channel.stream_unary(SERVICE + "Put"), channel.unary_stream(SERVICE + "Get"), unary


def get_request(keys: Sequence[BlockKey]) -> bytes:
    return pb.GetRequest(keys=check_keys(keys)).SerializeToString()


class GetAssembler:
    """Rebuilds the blocks of a Get reply from its frames, in order.

    A block that arrives inside one frame is returned as a read-only view of
    that frame (no copy); a block cut across frames, or any block when `out` is
    given, is copied once into its place.
    """

    def __init__(self, out: memoryview | np.ndarray | None, verify: bool) -> None:
        self._out = out
        self._verify = verify
        self._headers: list[pb.BlockHeader] | None = None
        self._slots: list[np.ndarray] | None = None  # with `out`: where each block goes
        self._blocks: list[np.ndarray] = []
        self._partial: np.ndarray | None = None
        self._filled = 0

    def feed(self, raw: bytes) -> None:
        frame = decode_frame(raw, pb.GetReply)
        if isinstance(frame, memoryview):
            self._feed_data(np.frombuffer(frame, np.uint8))
        elif frame.HasField("headers") and self._headers is None:
            self._headers = list(frame.headers.blocks)
            if self._out is not None:
                self._slots = block_slices(self._headers, self._out)[1]
        else:
            raise KVStoreError("unexpected frame in Get reply")

    def result(self) -> list[tuple[np.ndarray, pb.BlockMeta]]:
        if self._headers is None or len(self._blocks) != len(self._headers):
            raise Unavailable("Get reply ended before all blocks arrived")
        return received(self._blocks, self._headers, self._verify)

    def _feed_data(self, data: np.ndarray) -> None:
        headers = self._headers
        if headers is None:
            raise KVStoreError("Get reply sent data before headers")
        while len(data):
            if len(self._blocks) >= len(headers):
                raise KVStoreError("Get reply sent more bytes than its headers declared")
            size = headers[len(self._blocks)].meta.size
            if self._partial is None and self._slots is None and len(data) >= size:
                self._blocks.append(data[:size])  # whole in this frame: a view, no copy
                data = data[size:]
                continue
            if self._partial is None:
                self._partial = (
                    np.empty(size, np.uint8)
                    if self._slots is None
                    else self._slots[len(self._blocks)]
                )
            n = min(size - self._filled, len(data))
            self._partial[self._filled : self._filled + n] = data[:n]  # one copy: frame -> block
            self._filled += n
            data = data[n:]
            if self._filled == size:
                self._blocks.append(self._partial)
                self._partial, self._filled = None, 0


def verify_checksum(block: np.ndarray, meta: pb.BlockMeta, key: bytes) -> None:
    if meta.checksum and xxhash.xxh3_64_intdigest(block) != meta.checksum:
        raise CorruptBlock(f"block {key.hex()} failed its checksum")


def shaped(block: np.ndarray, meta: pb.BlockMeta) -> np.ndarray:
    """The block as the array it was put as: decoded, with its dtype and shape (raw bytes
    for a dtype numpy does not know)."""
    codec = codecs.get(meta.codec)
    if codec is not None:
        dtype = codecs.parse_dtype(meta.dtype) if meta.dtype else np.dtype(np.uint8)
        shape = tuple(meta.shape) if meta.dtype else (meta.raw_size,)
        return codec.decode(memoryview(block), dtype, shape, meta.layout)
    if not meta.dtype:
        return block
    try:
        dtype = np.dtype(meta.dtype)
    except TypeError:
        return block
    return block.view(dtype).reshape(tuple(meta.shape))


def writable_bytes(out: memoryview | np.ndarray, need: int) -> np.ndarray:
    """`out` as flat writable bytes with room for `need` of them, or InvalidArgument."""
    array = out if isinstance(out, np.ndarray) else np.frombuffer(out, np.uint8)
    if not (array.flags.c_contiguous and array.flags.writeable):
        raise InvalidArgument("out", "must be a writable, contiguous buffer")
    flat = array.reshape(-1).view(np.uint8)
    if len(flat) < need:
        raise InvalidArgument("out", f"holds {len(flat)} bytes, the blocks need {need}")
    return flat


def block_slices(
    headers: Sequence[pb.BlockHeader], out: memoryview | np.ndarray | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Where a reply's blocks land, back to back in `out` or in one fresh buffer: the
    whole span, and each block's slice of it."""
    total = sum(h.meta.size for h in headers)
    span = (np.empty(total, np.uint8) if out is None else writable_bytes(out, total))[:total]
    ends = np.cumsum([0, *(h.meta.size for h in headers)])
    return span, [span[a:b] for a, b in itertools.pairwise(ends)]


def received(
    blocks: Sequence[np.ndarray], headers: Sequence[pb.BlockHeader], verify: bool
) -> list[tuple[np.ndarray, pb.BlockMeta]]:
    """The blocks of a reply with their metadata, checksums checked when asked for."""
    if verify:
        for block, header in zip(blocks, headers, strict=True):
            verify_checksum(block, header.meta, header.key)
    return [(block, header.meta) for block, header in zip(blocks, headers, strict=True)]


def stats_from_proto(reply: pb.StatsReply) -> StoreStats:
    tiers = tuple(TierStats(**{f: getattr(t, f) for f in TierStats.__slots__}) for t in reply.tiers)
    return StoreStats(
        transfers=dict(reply.transfers),
        tiers=tiers,
        puts=reply.puts,
        gets=reply.gets,
        lookups=reply.lookups,
        uptime_s=reply.uptime_s,
    )


ERRORS: dict[grpc.StatusCode, type[KVStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.DATA_LOSS: CorruptBlock,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: Unsupported,
}


def error_from_rpc(exc: grpc.RpcError) -> KVStoreError:
    """The kvstore exception for a failed call, with the server's message."""
    return error_from_status(exc.code(), exc.details() or "")


def error_from_status(code: grpc.StatusCode, details: str) -> KVStoreError:
    cls = ERRORS.get(code, KVStoreError)
    if cls is InvalidArgument:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument("", details)
    return cls(f"{code.name}: {details}")
