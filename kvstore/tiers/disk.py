"""The disk tier: blocks appended to segment files in one directory.

A record is a 64-byte header and the block's metadata, padded to a page, then
the payload, padded to a page. Page-aligned records let payloads go from the
host arena (page-aligned slots) to disk by direct I/O: no copy into the page
cache, the CPU left to the network. The header holds a hash of itself and a
hash of metadata + payload:
- at start-up, segments are scanned header by header to rebuild the index; a
  torn or garbled header ends its segment, which is cut there;
- every read checks the payload hash, so a torn or corrupted block is dropped,
  counted and logged, never served.
A delete rewrites the record's header in place as dead, so a restart cannot
bring the block back. Space is reclaimed a segment at a time: when the tier is
full the least recently used segment is dropped, and a segment whose blocks are
all gone is dropped at once.

What a crash of the machine can lose, by `fsync` policy (a crash of the daemon
alone loses nothing written, the kernel holds it):
- `batch`: nothing the tier reported durable: each demotion batch is synced
  before its blocks count as on disk;
- `interval`: the last second of writes;
- `never`: whatever the kernel had not written back (typically up to 30 s).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from kvstore.errors import KVStoreError, ResourceExhausted
from kvstore.keys import KEY_BYTES, BlockKey
from kvstore.meta import BlockMeta
from kvstore.tiers import TierStats, present_count

log = logging.getLogger("kvstore.disk")

MAGIC = b"KVS1"
VERSION = 1
LIVE, DEAD = 0, 1
HEAD = struct.Struct(f"<4sHHIQ{KEY_BYTES}sQ12x")  # magic version kind meta_len size key body_hash
HEADER = HEAD.size + 8  # then an xxh3-64 of the bytes before it
PAGE = 4096  # record alignment: a header never straddles a sector; direct I/O works
FSYNC_POLICIES = ("batch", "interval", "never")


def _align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _record(meta_len: int, size: int) -> tuple[int, int]:
    """(payload offset within the record, record length)."""
    head = _align(HEADER + meta_len)
    return head, head + _align(size)


def _page_aligned(view: memoryview) -> bool:
    return np.frombuffer(view, np.uint8).ctypes.data % PAGE == 0


def encode_header(kind: int, key: BlockKey, meta: bytes, size: int, body_hash: int) -> bytes:
    head = HEAD.pack(MAGIC, VERSION, kind, len(meta), size, key, body_hash)
    return head + xxhash.xxh3_64_digest(head)


def decode_header(raw: bytes) -> tuple[int, BlockKey, int, int, int] | None:
    """(kind, key, meta_len, size, body_hash), or None for a torn or foreign header."""
    if len(raw) < HEADER or xxhash.xxh3_64_digest(raw[: HEAD.size]) != raw[HEAD.size : HEADER]:
        return None
    magic, version, kind, meta_len, size, key, body_hash = HEAD.unpack(raw[: HEAD.size])
    if magic != MAGIC or version != VERSION or kind not in (LIVE, DEAD):
        return None
    return kind, key, meta_len, size, body_hash


def encode_meta(meta: BlockMeta) -> bytes:
    fields = [meta.dtype, list(meta.shape), meta.layout, meta.codec, meta.raw_size, meta.checksum]
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_meta(raw: bytes, size: int) -> BlockMeta:
    dtype, shape, layout, codec, raw_size, checksum = json.loads(raw)
    return BlockMeta(size, dtype, tuple(shape), layout, codec, raw_size, checksum)


def _pwrite_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
    """pwritev until every byte is written; a short write is retried, so a full disk
    surfaces as its OSError (ENOSPC, EFBIG) rather than a count."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        n = os.pwritev(fd, views, offset)
        if n == 0:
            raise OSError("write made no progress")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if views:
            views[0] = views[0][n:]


@dataclass(slots=True, eq=False)
class _Segment:
    id: int
    path: Path
    fd: int
    direct: int = -1  # the same file opened for direct I/O, where the file system allows
    size: int = 0
    used: int = 0  # monotonic stamp of the last write or read: LRU by segment
    keys: set[BlockKey] = field(default_factory=set)
    readers: int = 0
    dropped: bool = False

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd >= 0:
                os.close(fd)


@dataclass(frozen=True, slots=True)
class _Entry:
    key: BlockKey
    segment: _Segment
    offset: int  # of the record's header
    meta: BlockMeta
    meta_raw: bytes
    body_hash: int


class DiskTier:
    name = "disk"

    def __init__(
        self,
        directory: str | os.PathLike,
        capacity: int,
        *,
        segment_size: int = 256 << 20,
        fsync: str = "batch",
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync: expected one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.segment_size = segment_size
        self.fsync = fsync
        self._lock = threading.Lock()  # index, segments, stats; never held during I/O
        self._write = threading.Lock()  # one appender at a time
        self._index: dict[BlockKey, _Entry] = {}
        self._segments: dict[int, _Segment] = {}
        self._clock = 0
        self._total = 0  # bytes of segment files
        self._stats = TierStats(self.name, capacity=capacity)
        self._unsynced: set[_Segment] = set()
        self._head = memoryview(mmap.mmap(-1, 1 << 16))  # page-aligned scratch for direct I/O
        self._tail = memoryview(mmap.mmap(-1, PAGE))
        self._load()
        self._active = self._new_segment()
        self._stop = threading.Event()
        self._syncer = None
        if fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_every_second, daemon=True)
            self._syncer.start()

    # -- reads -------------------------------------------------------------

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._index

    def present_prefix(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            return present_count(keys, self._index)

    def meta(self, key: BlockKey) -> BlockMeta | None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                self._stats.misses += 1
            return entry.meta if entry else None

    def read_into(self, key: BlockKey, out: memoryview) -> BlockMeta | None:
        """Read `key`'s payload into `out`; None if absent or found corrupt (then dropped)."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None or len(out) < entry.meta.size:
                return None
            segment = entry.segment
            segment.readers += 1
            segment.used = self._tick()
        size = entry.meta.size
        start = entry.offset + _record(len(entry.meta_raw), size)[0]
        try:
            n = os.preadv(segment.fd, [out[:size]], start)
            error = f"block {key.hex()} in {segment.path.name} fails its checksum"
        except OSError as exc:
            n, error = -1, f"reading {segment.path.name}: {exc}"
        finally:
            with self._lock:
                segment.readers -= 1
                if segment.dropped and not segment.readers:
                    segment.close()
        if n == size and self._body_hash(entry.meta_raw, out[:size]) == entry.body_hash:
            with self._lock:
                self._stats.hits += 1
            return entry.meta
        self._fail(error, drop=entry)
        return None

    # -- writes ------------------------------------------------------------

    def append(self, blocks: Sequence[tuple[BlockKey, BlockMeta, memoryview]]) -> int:
        """Write blocks not already here; return how many were written.

        A failed write (disk full, I/O error) is logged and counted and the
        block skipped: the tier is a cache, the daemon keeps serving.
        """
        written = 0
        with self._write:
            for key, meta, payload in blocks:
                if self.contains(key):
                    continue
                try:
                    written += self._append(key, meta, payload)
                except (OSError, KVStoreError) as exc:
                    self._fail(f"writing block {key.hex()}: {exc}")
            if self.fsync == "batch":
                self.sync()
        return written

    def _append(self, key: BlockKey, meta: BlockMeta, payload: memoryview) -> bool:
        meta_raw = encode_meta(meta)
        body_hash = self._body_hash(meta_raw, payload)
        head, length = _record(len(meta_raw), meta.size)
        if length > self.capacity or head > len(self._head):
            raise ResourceExhausted(f"block of {meta.size} bytes does not fit the disk tier")
        self._make_room(length)
        segment = self._active
        record = encode_header(LIVE, key, meta_raw, meta.size, body_hash) + meta_raw
        self._head[:head] = record + bytes(head - len(record))
        whole = meta.size - meta.size % PAGE  # the payload's full pages go straight from memory
        tail = meta.size - whole
        self._tail[:] = bytes(payload[whole:]) + bytes(PAGE - tail)
        buffers = [self._head[:head], payload[:whole], self._tail[: PAGE if tail else 0]]
        direct = segment.direct >= 0 and _page_aligned(payload)
        try:
            _pwrite_all(segment.direct if direct else segment.fd, buffers, segment.size)
        except OSError:
            os.ftruncate(segment.fd, segment.size)  # leave no partial record behind
            raise
        entry = _Entry(key, segment, segment.size, meta, meta_raw, body_hash)
        with self._lock:
            segment.size += length
            segment.used = self._tick()
            segment.keys.add(key)
            self._total += length
            self._index[key] = entry
            self._stats.blocks += 1
            self._stats.bytes += meta.size
            self._unsynced.add(segment)
        return True

    def _make_room(self, length: int) -> None:
        """Roll to a new segment when the active one is full; drop cold segments for space."""
        if self._active.size and self._active.size + length > self.segment_size:
            self._sync_segment(self._active)
            self._active = self._new_segment()
        while self._total + length > self.capacity:
            with self._lock:
                cold = [s for s in self._segments.values() if s is not self._active]
                if not cold:
                    raise ResourceExhausted(f"no room for {length} bytes in the disk tier")
                victim = min(cold, key=lambda s: s.used)
                self._stats.evictions += len(victim.keys)
                self._drop_segment(victim)

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Forget `keys` and mark their records dead on disk, so they stay gone after restart."""
        deleted = 0
        with self._write:
            for key in dict.fromkeys(keys):
                with self._lock:
                    entry = self._index.get(key)
                    if entry is None:
                        continue
                    self._forget(key, entry)
                    entry.segment.readers += 1  # keep the fd open while we write
                deleted += 1
                try:
                    dead = encode_header(
                        DEAD, key, entry.meta_raw, entry.meta.size, entry.body_hash
                    )
                    os.pwrite(entry.segment.fd, dead, entry.offset)
                    self._unsynced.add(entry.segment)
                except OSError as exc:
                    self._fail(f"marking block {key.hex()} deleted: {exc}")
                finally:
                    with self._lock:
                        entry.segment.readers -= 1
                        self._drop_if_empty(entry.segment)
            if self.fsync == "batch" and deleted:
                self.sync()
        return deleted

    def sync(self) -> None:
        """Make every write so far durable."""
        with self._lock:
            pending, self._unsynced = self._unsynced, set()
        for segment in pending:
            self._sync_segment(segment)

    def stats(self) -> TierStats:
        with self._lock:
            return self._stats.snapshot()

    def close(self) -> None:
        self._stop.set()
        if self._syncer:
            self._syncer.join()
        with self._write:
            if self.fsync != "never":
                self.sync()
            with self._lock:
                for segment in list(self._segments.values()):
                    if not segment.readers:
                        segment.close()
                    segment.dropped = True
                self._segments.clear()

    # -- internals ---------------------------------------------------------

    def _load(self) -> None:
        """Rebuild the index from the segment files, cutting torn tails."""
        for path in sorted(self.directory.glob("seg-*.kvs")):
            try:
                segment_id = int(path.stem.removeprefix("seg-"))
            except ValueError:
                continue
            segment = _Segment(segment_id, path, os.open(path, os.O_RDWR))
            self._segments[segment_id] = segment
            self._scan(segment, os.fstat(segment.fd).st_size)
            self._total += segment.size
            if not segment.keys:
                self._drop_segment(segment)
        if self._index:
            log.info("disk tier: %d blocks in %d segments", len(self._index), len(self._segments))

    def _scan(self, segment: _Segment, end: int) -> None:
        offset = 0
        while offset + HEADER <= end:
            parsed = decode_header(os.pread(segment.fd, HEADER, offset))
            if parsed is None:
                break
            kind, key, meta_len, size, body_hash = parsed
            length = _record(meta_len, size)[1]
            if offset + length > end:
                break
            if kind == LIVE:
                meta_raw = os.pread(segment.fd, meta_len, offset + HEADER)
                try:
                    meta = decode_meta(meta_raw, size)
                except (ValueError, TypeError) as exc:
                    self._fail(f"{segment.path.name}@{offset}: bad metadata: {exc}")
                else:
                    old = self._index.get(key)
                    if old is not None:
                        self._forget(key, old)
                    self._index[key] = _Entry(key, segment, offset, meta, meta_raw, body_hash)
                    segment.keys.add(key)
                    self._stats.blocks += 1
                    self._stats.bytes += size
            offset += length
        if offset < end:
            log.warning(
                "disk tier: %s: cut %d torn bytes at %d", segment.path.name, end - offset, offset
            )
            os.ftruncate(segment.fd, offset)
        segment.size = offset
        segment.used = self._tick()

    def _new_segment(self) -> _Segment:
        segment_id = max(self._segments, default=0) + 1
        path = self.directory / f"seg-{segment_id:08d}.kvs"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            direct = os.open(path, os.O_WRONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else -1
        except OSError:  # a file system without direct I/O: write through the page cache
            direct = -1
        segment = _Segment(segment_id, path, fd, direct)
        segment.used = self._tick()
        with self._lock:
            self._segments[segment_id] = segment
        return segment

    def _forget(self, key: BlockKey, entry: _Entry) -> None:
        """Drop `key` from the index (lock held)."""
        del self._index[key]
        entry.segment.keys.discard(key)
        self._stats.blocks -= 1
        self._stats.bytes -= entry.meta.size

    def _drop_if_empty(self, segment: _Segment) -> None:
        if not segment.keys and segment is not self._active and not segment.dropped:
            self._drop_segment(segment)

    def _drop_segment(self, segment: _Segment) -> None:
        """Remove a whole segment (lock held, or before the tier is shared)."""
        for key in list(segment.keys):
            self._forget(key, self._index[key])
        del self._segments[segment.id]
        self._unsynced.discard(segment)
        self._total -= segment.size
        segment.dropped = True
        segment.path.unlink(missing_ok=True)
        if not segment.readers:
            segment.close()

    def _sync_segment(self, segment: _Segment) -> None:
        if self.fsync == "never":
            return
        with self._lock:
            if segment.dropped:
                return
            segment.readers += 1
        try:
            os.fdatasync(segment.fd)
        except OSError as exc:
            self._fail(f"syncing {segment.path.name}: {exc}")
        finally:
            with self._lock:
                segment.readers -= 1
                if segment.dropped and not segment.readers:
                    segment.close()

    def _sync_every_second(self) -> None:
        while not self._stop.wait(1.0):
            self.sync()

    def _fail(self, error: str, drop: _Entry | None = None) -> None:
        log.error("disk tier: %s", error)
        with self._lock:
            self._stats.errors += 1
            self._stats.last_error = error
            if drop is not None and self._index.get(drop.key) is drop:
                self._forget(drop.key, drop)
                self._drop_if_empty(drop.segment)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @staticmethod
    def _body_hash(meta_raw: bytes, payload: memoryview) -> int:
        h = xxhash.xxh3_64(meta_raw)
        h.update(payload)
        return h.intdigest()
