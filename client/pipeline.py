"""What a client does to blocks on either side of a transfer, whatever the path: checks a
put's payloads, encodes them in parts (the pool encodes the next while one is sent), and
turns what a get received back into the arrays that were put, checked and decoded.
No I/O here."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import xxhash

from kvstore import codecs
from kvstore.errors import InvalidArgument
from kvstore.keys import BlockKey, check_keys
from kvstore.limits import MAX_BLOCKS
from kvstore.meta import BlockMeta, check_stored

_POOLED_CHECK = 1 << 20  # blocks this large are checked in the pool, off the receiving thread
ENCODED_PART = 32 << 20
"""Raw bytes per part of an encoded put: one part is sent while the pool encodes the next."""

Payload = bytes | bytearray | memoryview | np.ndarray
Block = tuple[BlockKey, BlockMeta]
BYTES = np.dtype(np.uint8)  # what a payload that is not an array encodes as
T = TypeVar("T")


@dataclass(frozen=True)
class Encoding:
    """How a client encodes what it puts: the codec (see `kvstore.codecs`), the tensor
    layout it records (axis names, e.g. "tokens,layers,kv,heads,dim"), and checksums."""

    codec: str = "none"  # or "auto": resolved per kind of payload by the client
    layout: str = ""
    checksum: bool = True

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


@dataclass
class Received:
    """What one get brought back, in key order: stored bytes and each block's key and
    metadata, not yet checked or decoded. `truncated`: the node stopped before a key it
    holds (ask again for the rest), not at a miss."""

    arrays: list[np.ndarray] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    truncated: bool = False


def check_dtype(dtype: np.dtype, field: str) -> None:
    """Payload arrays hold plain numbers (numpy's own or an extension type such as
    bfloat16): an object, structured or void dtype would come back as bytes, not as itself."""
    plain = dtype.kind in "biufc" or (dtype.kind == "V" and dtype.isbuiltin == 2)
    if not plain or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgument(field, f"dtype {dtype} is not a plain numeric dtype")


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


def as_bytes(payload: Payload) -> tuple[memoryview, str, tuple[int, ...]]:
    """A flat byte view of a payload (no copy when contiguous) and its dtype and shape."""
    if isinstance(payload, np.ndarray):
        array = np.ascontiguousarray(payload)  # copies only a non-contiguous array
        view = array.reshape(-1).view(np.uint8).data
        return view, codecs.dtype_name(array.dtype), array.shape
    view = memoryview(payload)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view, "", ()


def encoded_parts(
    keys: Sequence[BlockKey],
    payloads: Sequence[Payload],
    encoding: Encoding,
    pool: Executor,
) -> Iterator[tuple[list[Block], list[memoryview]]]:
    """Blocks and flat byte views of a checked batch, in parts of at most `MAX_BLOCKS`
    blocks (and, with a codec, about `ENCODED_PART` raw bytes). With a codec, the pool
    encodes every block in order and each part is yielded once its blocks are done, so a
    part goes out while the next is encoded. A dtype the codec refuses raises first."""
    codec = codecs.get(encoding.codec)
    sizes = [payload_size(p) for p in payloads]
    if codec is not None:
        for p in payloads:  # every payload, before any part goes out
            codec.check(p.dtype if isinstance(p, np.ndarray) else BYTES)

    def encode(payload: Payload) -> tuple[memoryview, BlockMeta]:
        view, dtype, shape = as_bytes(payload)
        raw_size, name = 0, ""
        if codec is not None:
            array = payload if isinstance(payload, np.ndarray) else np.frombuffer(view, np.uint8)
            raw_size, name = len(view), codec.name
            packed = codec.pack(np.ascontiguousarray(array), encoding.layout)
            view = packed.data if isinstance(packed, np.ndarray) else memoryview(packed)
        checksum = xxhash.xxh3_64_intdigest(view) if encoding.checksum else 0
        meta = BlockMeta(len(view), dtype, tuple(shape), encoding.layout, name, raw_size, checksum)
        return view, meta

    def part(first: int, encoded: list[tuple[memoryview, BlockMeta]]):
        blocks = [(keys[first + i], meta) for i, (_, meta) in enumerate(encoded)]
        return blocks, [view for view, _ in encoded]

    if codec is None:
        for run in batches(sizes, 1 << 62):
            yield part(run.start, [encode(p) for p in payloads[run]])
        return
    futures = [submit(pool, encode, p) for p in payloads]
    try:
        for run in batches(sizes, ENCODED_PART):
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
    """Turns received blocks into the arrays they were put as: checks each against its
    checksum and decodes it. Large or encoded blocks go to the pool as they arrive
    (`arrived`), so checking and decoding overlap the rest of the transfer."""

    def __init__(self, pool: Executor, verify: bool) -> None:
        self._pool = pool
        self._verify = verify
        self._done: list[Future | np.ndarray] = []

    def arrived(self, arrays: Sequence[np.ndarray], blocks: Sequence[Block]) -> None:
        for array, (key, meta) in zip(arrays, blocks, strict=True):
            heavy = meta.codec not in ("", "none") or (
                self._verify and array.nbytes >= _POOLED_CHECK
            )
            args = (array, key, meta, self._verify)
            self._done.append(submit(self._pool, finished, *args) if heavy else finished(*args))

    def result(self, received: Received) -> list[np.ndarray]:
        """The arrays of everything received, those not seen yet checked and decoded now;
        a block that fails its checksum raises CorruptBlock."""
        seen = len(self._done)
        self.arrived(received.arrays[seen:], received.blocks[seen:])
        return [d.result() if isinstance(d, Future) else d for d in self._done]


def submit(pool: Executor, fn: Callable[..., T], *args: object) -> Future[T]:
    """`pool.submit`; a pool shut down is a client closed while a call of it still ran
    (another thread's): that call fails as any call of a closed client does."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # "cannot schedule new futures after shutdown"
        raise ValueError("the client was closed while this call ran") from None


def finished(array: np.ndarray, key: BlockKey, meta: BlockMeta, verify: bool) -> np.ndarray:
    if verify:
        check_stored(array.data, key, meta)
    try:
        return shaped(array, meta)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.field, f"block {key.hex()}: {exc.reason}") from None


def shaped(block: np.ndarray, meta: BlockMeta) -> np.ndarray:
    """The block as the array it was put as: decoded, with its dtype and shape (raw bytes
    for a dtype numpy does not know). Metadata that disagrees with the bytes (a shape and
    dtype of another size than the block's, or than its declared `raw_size` when encoded)
    raises InvalidArgument; decoding never goes past `raw_size`."""
    codec = codecs.get(meta.codec)
    if codec is not None:
        dtype = codecs.parse_dtype(meta.dtype) if meta.dtype else np.dtype(np.uint8)
        if dtype is None:
            raise InvalidArgument("dtype", f"{meta.dtype!r} is no dtype a codec decodes to")
        shape = tuple(meta.shape) if meta.dtype else (meta.raw_size,)
        return codec.decode(block.data, dtype, shape, meta.layout, meta.raw_size)
    dtype = codecs.parse_dtype(meta.dtype) if meta.dtype else None
    if dtype is None:
        return block
    shape = tuple(meta.shape)
    if math.prod(shape) * dtype.itemsize != block.nbytes:
        raise InvalidArgument("shape", f"{dtype} {shape} does not fill a block of {block.nbytes} B")
    try:
        return block.view(dtype).reshape(shape)
    except (ValueError, TypeError) as exc:  # a dtype a buffer cannot hold (objects)
        raise InvalidArgument("dtype", f"{meta.dtype!r}: {exc}") from None


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
    metas: Sequence[BlockMeta], out: memoryview | np.ndarray | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Where a reply's blocks land, back to back in `out` or in one fresh buffer: the
    whole span, and each block's slice of it."""
    total = sum(meta.size for meta in metas)
    span = (np.empty(total, np.uint8) if out is None else writable_bytes(out, total))[:total]
    ends = np.cumsum([0, *(meta.size for meta in metas)])
    return span, [span[a:b] for a, b in itertools.pairwise(ends)]
