"""The disk tier: blocks appended to segment files in one directory.

Records are page-aligned (kvstore/tiers/segments.py), so payloads go from the
host arena (page-aligned slots) to disk by direct I/O: no copy into the page
cache, the CPU left to the network.
- At start-up the directory is locked (one daemon per directory) and segments
  are scanned header by header to rebuild the index. A damaged header costs its
  own record, never the rest of the segment; an incomplete tail is cut.
- Every read checks the payload hash, so a torn or corrupted block is dropped,
  counted and logged, never served.
- A delete rewrites the record's header as dead, so a restart cannot bring the
  block back.
- Space comes back without losing live blocks: a segment that is mostly dead is
  compacted (its live records copied forward, then the file dropped). Only when
  the tier is full of live blocks is the oldest segment evicted, and then the
  blocks read since they were written (here or, `touch`, in the tier above) get
  a second chance: they are copied forward, so a hot block outlives its segment.
  On a production trace this keeps as many hits as one LRU cache of the tier's
  capacity, where evicting whole segments by LRU keeps 0.90 of them.

What a crash of the machine can lose, by `fsync` policy (a crash of the daemon
alone loses nothing written, the kernel holds it):
- `batch`: nothing the tier reported durable: each demotion batch is synced
  before its blocks count as on disk;
- `interval`: the last second of writes;
- `never`: whatever the kernel had not written back (typically up to 30 s).
`persist` (a durable put) writes and syncs its blocks' records whatever the
policy, except `never`, where written is all it promises. Each segment knows
how far it is synced; a failed sync loses its records past that point from the
index (their bytes may never reach the disk), so nothing unsynced passes for
durable.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvstore.errors import KVStoreError, ResourceExhausted, Unavailable
from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.results import TierStats
from kvstore.tiers import Changes, present_count
from kvstore.tiers.segments import (
    DEAD,
    HEADER,
    LIVE,
    PAGE,
    SegmentFormat,
    align,
    body_hash,
    layout,
)

log = logging.getLogger("kvstore.disk")

FSYNC_POLICIES = ("batch", "interval", "never")
COMPACT_BELOW = 0.5  # a segment whose live records fill less than this is compacted
COMPACT_WHEN_FULL = 0.875  # a full tier compacts before it evicts, up to 8 bytes copied per byte
DEAD_SHARE = 0.25  # compact in the background once this share of the files is dead
LOCK_FILE = "LOCK"
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write that failed for want of room


class DirectoryInUse(OSError):
    """Another daemon holds the disk tier's directory."""


def encode_meta(meta: BlockMeta) -> bytes:
    fields = [meta.dtype, list(meta.shape), meta.layout, meta.codec, meta.raw_size, meta.checksum]
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_meta(raw: bytes, size: int) -> BlockMeta:
    dtype, shape, layout_, codec, raw_size, checksum = json.loads(raw)
    return BlockMeta(size, dtype, tuple(shape), layout_, codec, raw_size, checksum)


def _pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> None:
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


def _page_aligned(view: memoryview) -> bool:
    return np.frombuffer(view, np.uint8).ctypes.data % PAGE == 0


@dataclass(slots=True, eq=False)
class _Segment:
    id: int
    path: Path
    fd: int
    format: SegmentFormat
    direct: int = -1  # the same file opened for direct I/O, where the file system allows
    size: int = PAGE  # bytes of the file in use: its first page, then records
    synced: int = PAGE  # bytes of it known to be on disk (fdatasync); records past it may not be
    live: int = 0  # bytes of live records
    keys: set[BlockKey] = field(default_factory=set)
    readers: int = 0
    dropped: bool = False

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd >= 0:
                os.close(fd)


@dataclass(slots=True, eq=False)
class _Entry:
    key: BlockKey
    segment: _Segment
    offset: int  # of the record's header
    meta: BlockMeta
    meta_raw: bytes
    body_hash: int
    hit: bool = False  # read since written: carried forward when its segment is evicted

    @property
    def length(self) -> int:
        return layout(len(self.meta_raw), self.meta.size)[1]


class _Scratch:
    """Page-aligned memory reused across writes (direct I/O needs aligned buffers)."""

    def __init__(self, size: int) -> None:
        self.view = memoryview(mmap.mmap(-1, size))

    def at_least(self, size: int) -> memoryview:
        if len(self.view) < size:
            self.view = memoryview(mmap.mmap(-1, align(size)))
        return self.view[:size]


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
        self._lock_fd = _lock_directory(self.directory)
        self.capacity = capacity
        self.segment_size = segment_size
        self.fsync = fsync
        self._lock = threading.Lock()  # index, segments, stats; never held during I/O
        self._write = threading.Lock()  # one writer (append, delete, compaction) at a time
        self._index: dict[BlockKey, _Entry] = {}
        self._segments: dict[int, _Segment] = {}
        self._last_id = 0  # of the segment files in the directory, ours or not
        self._total = 0  # bytes of segment files
        self._stats = TierStats(self.name, capacity=capacity)
        self.changes = Changes(self.name)
        self._unsynced: set[_Segment] = set()
        self._write_error: BaseException | None = None  # the last write or sync that failed
        self._head = _Scratch(1 << 16)  # header and metadata pages
        self._tail = _Scratch(PAGE)  # a payload's last, partial page
        self._carry = _Scratch(PAGE)  # records copied forward
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

    def read_into(self, keys: Sequence[BlockKey], outs: Sequence[memoryview]) -> list[BlockMeta]:
        """Read the payloads of `keys` into `outs` (one each, at least the block's size) and
        check each; returns the metadata of those read whole, a prefix of `keys`: it stops at
        a block that is absent or found corrupt (then dropped)."""
        entries: list[_Entry] = []
        with self._lock:
            for key, out in zip(keys, outs, strict=False):
                entry = self._index.get(key)
                if entry is None or len(out) < entry.meta.size:
                    break
                entry.hit = True
                entries.append(entry)
        read = []
        for entry, out in zip(entries, outs, strict=False):
            if not self._read_payload(entry, out[: entry.meta.size]):
                self.changes.report()  # found corrupt: dropped
                break
            read.append(entry.meta)
        with self._lock:
            self._stats.hits += len(read)
        return read

    def touch(self, keys: Sequence[BlockKey]) -> None:
        """Blocks read from a copy above: they count as read here too (second chance)."""
        with self._lock:
            for key in keys:
                if (entry := self._index.get(key)) is not None:
                    entry.hit = True

    def _read_payload(self, entry: _Entry, out: memoryview) -> bool:
        """Read and check one record's payload; a bad one is dropped, counted and logged."""
        segment = entry.segment
        with self._lock:
            if segment.dropped:
                return False
            segment.readers += 1
        start = entry.offset + layout(len(entry.meta_raw), entry.meta.size)[0]
        try:
            n = os.preadv(segment.fd, [out], start)
            error = f"block {entry.key.hex()} in {segment.path.name} fails its checksum"
        except OSError as exc:
            n, error = -1, f"reading {segment.path.name}: {exc}"
        finally:
            with self._lock:
                segment.readers -= 1
                if segment.dropped and not segment.readers:
                    segment.close()
        if n == len(out) and body_hash(entry.meta_raw, out) == entry.body_hash:
            return True
        self._fail(error, drop=entry)
        return False

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
                    self._write_error = exc
                    self._fail(f"writing block {key.hex()}: {exc}")
            self._compact_dead()
            if self.fsync == "batch":
                self.sync()
        self.changes.report()
        return written

    def persist(
        self,
        blocks: Sequence[tuple[BlockKey, BlockMeta, memoryview]],
        keys: Sequence[BlockKey],
    ) -> None:
        """What a durable put waits for: write those of `blocks` not here yet, then make
        the record of every one of `keys` durable (synced; only written under `never`).
        Raises, naming the directory, if any is not: ResourceExhausted when the disk
        (or the tier) is full, Unavailable for any other failure."""
        failures: list[BaseException] = []
        with self._write:
            for key, meta, payload in blocks:
                if self.contains(key):
                    continue
                try:
                    self._append(key, meta, payload)
                except (OSError, KVStoreError) as exc:
                    self._write_error = exc
                    failures.append(exc)
                    self._fail(f"writing block {key.hex()}: {exc}")
            if self.fsync != "never":
                with self._lock:
                    behind = {
                        entry.segment
                        for key in keys
                        if (entry := self._index.get(key)) is not None and not self._synced(entry)
                    }
                for segment in sorted(behind, key=lambda s: s.id):
                    if (error := self._sync_segment(segment)) is not None:
                        failures.append(error)
            with self._lock:
                missing = [
                    key
                    for key in keys
                    if (entry := self._index.get(key)) is None or not self._synced(entry)
                ]
            cause = failures[-1] if failures else self._write_error
        self.changes.report()
        if missing:
            full = isinstance(cause, ResourceExhausted) or (
                isinstance(cause, OSError) and cause.errno in FULL
            )
            gone = f"no copy left to write (deleted, or lost to a failed write: {cause})"
            why = str(failures[-1]) if failures else gone
            message = (
                f"disk tier {self.directory}: {len(missing)} of {len(keys)} blocks of a durable "
                f"put are not on disk{' (full)' if full else ''}: {why}"
            )
            raise ResourceExhausted(message) if full else Unavailable(message)

    def _synced(self, entry: _Entry) -> bool:
        """Whether `entry`'s record is on disk as the policy has it (lock held)."""
        return self.fsync == "never" or entry.offset + entry.length <= entry.segment.synced

    def maintain(self) -> None:
        """Give back space held by dead records (called when the daemon is idle)."""
        with self._write:
            if self._compact_dead() and self.fsync == "batch":
                self.sync()
        self.changes.report()

    def _append(
        self,
        key: BlockKey,
        meta: BlockMeta,
        payload: memoryview,
        *,
        meta_raw: bytes | None = None,
        make_room: bool = True,
    ) -> bool:
        meta_raw = encode_meta(meta) if meta_raw is None else meta_raw
        body = body_hash(meta_raw, payload)
        head, length = layout(len(meta_raw), meta.size)
        if length > self.capacity or HEADER + len(meta_raw) > 1 << 16:
            raise ResourceExhausted(f"block of {meta.size} bytes does not fit the disk tier")
        if make_room:
            self._make_room(length)
        elif self._active.size > PAGE and self._active.size + length > self.segment_size:
            self._roll()
        segment = self._active
        record = segment.format.encode(LIVE, key, len(meta_raw), meta.size, body) + meta_raw
        if length == PAGE:  # small: header, metadata and payload share one page
            page = self._head.at_least(PAGE)
            page[: len(record)] = record
            page[len(record) : len(record) + meta.size] = payload
            page[len(record) + meta.size :] = bytes(PAGE - len(record) - meta.size)
            buffers: list[memoryview] = [page]
        else:
            first = self._head.at_least(head)
            first[: len(record)] = record
            first[len(record) :] = bytes(head - len(record))
            whole = meta.size - meta.size % PAGE  # full pages go straight from memory
            tail = self._tail.at_least(PAGE)
            rest = meta.size - whole
            tail[:rest] = payload[whole:]
            tail[rest:] = bytes(PAGE - rest)
            buffers = [first, payload[:whole], tail[: PAGE if rest else 0]]
        direct = segment.direct >= 0 and all(_page_aligned(b) for b in buffers if len(b))
        try:
            _pwrite_all(segment.direct if direct else segment.fd, buffers, segment.size)
        except OSError:
            os.ftruncate(segment.fd, segment.size)  # leave no partial record behind
            raise
        entry = _Entry(key, segment, segment.size, meta, meta_raw, body)
        with self._lock:
            old = self._index.get(key)
            if old is not None:  # a record carried forward replaces its older copy
                self._forget(key, old, moved=True)
            else:
                self.changes.stored(key)
            segment.size += length
            segment.live += length
            segment.keys.add(key)
            self._total += length
            self._index[key] = entry
            self._stats.blocks += 1
            self._stats.bytes += length
            self._stats.payload_bytes += meta.size
            self._unsynced.add(segment)
        return True

    def _make_room(self, length: int) -> None:
        """Roll to a new segment when the active one is full; reclaim segments for space:
        dead records first (compaction), live blocks only from a tier full of them."""
        if self._active.size > PAGE and self._active.size + length > self.segment_size:
            self._roll()
        while self._total + length > self.capacity:
            with self._lock:
                cold = [s for s in self._segments.values() if s is not self._active]
            if not cold:
                raise ResourceExhausted(f"no room for {length} bytes in the disk tier")
            sparse = min(cold, key=lambda s: s.live / s.size)
            if sparse.live < COMPACT_WHEN_FULL * sparse.size:
                self._reclaim(sparse, evict=False)
            else:  # the oldest: its blocks read since have their second chance
                self._reclaim(min(cold, key=lambda s: s.id), evict=True)

    def _compact_dead(self) -> bool:
        """Compact the sparsest segment once dead records fill `DEAD_SHARE` of the files."""
        with self._lock:
            cold = [s for s in self._segments.values() if s is not self._active]
        if not cold or self._dead_bytes() <= DEAD_SHARE * self._total:
            return False
        sparse = min(cold, key=lambda s: s.live / s.size)
        if sparse.live >= COMPACT_BELOW * sparse.size:
            return False
        self._reclaim(sparse, evict=False)
        return True

    def _dead_bytes(self) -> int:
        """Bytes of the files held by dead or damaged records."""
        with self._lock:
            live = sum(s.live + PAGE for s in self._segments.values())
            return self._total - live

    def _reclaim(self, segment: _Segment, *, evict: bool) -> None:
        """Drop a segment, first copying forward its live records (compaction) or, when
        evicting, only those read since they were written (their second chance)."""
        with self._lock:
            entries = [self._index[k] for k in segment.keys]
        carried = [e for e in entries if e.hit or not evict]
        for entry in carried:
            entry.hit = False
            buffer = self._carry.at_least(entry.meta.size)
            if not self._read_payload(entry, buffer):
                continue  # corrupt: dropped, not carried
            try:
                self._append(
                    entry.key, entry.meta, buffer, meta_raw=entry.meta_raw, make_room=False
                )
            except (OSError, KVStoreError) as exc:
                self._fail(f"copying block {entry.key.hex()} forward: {exc}")
        with self._lock:
            if evict:
                self._stats.evictions += len(segment.keys)
            if not segment.dropped:
                self._drop_segment(segment)

    def _roll(self) -> None:
        self._sync_segment(self._active)
        self._active = self._new_segment()

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
                segment = entry.segment
                try:
                    dead = segment.format.encode(
                        DEAD, key, len(entry.meta_raw), entry.meta.size, entry.body_hash
                    )
                    os.pwrite(segment.fd, dead, entry.offset)
                    self._unsynced.add(segment)
                except OSError as exc:
                    self._fail(f"marking block {key.hex()} deleted: {exc}")
                finally:
                    with self._lock:
                        segment.readers -= 1
                        self._drop_if_empty(segment)
            if self.fsync == "batch" and deleted:
                self.sync()
        self.changes.report()
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

    def listing(self) -> list[BlockKey]:
        with self._lock:
            return list(self._index)

    def file_bytes(self) -> int:
        """Bytes of segment files on disk, dead records included."""
        with self._lock:
            return self._total

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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the directory lock
            self._lock_fd = -1

    # -- internals ---------------------------------------------------------

    def _load(self) -> None:
        """Rebuild the index from the segment files, skipping damaged records."""
        for path in sorted(self.directory.glob("seg-*.kvs")):
            try:
                segment_id = int(path.stem.removeprefix("seg-"))
            except ValueError:
                continue
            self._last_id = max(self._last_id, segment_id)
            fd = os.open(path, os.O_RDWR)
            first_page = os.pread(fd, PAGE, 0)
            form = SegmentFormat.read(first_page)
            if form is None:
                os.close(fd)
                if len(first_page) < PAGE:  # created, then a crash before its first page
                    path.unlink()
                else:
                    log.warning("disk tier: %s is not a segment of this format: left alone", path)
                continue
            segment = _Segment(segment_id, path, fd, form)
            self._segments[segment_id] = segment
            self._scan(segment, os.fstat(fd).st_size)
            segment.synced = segment.size  # it outlived the process that wrote it
            self._total += segment.size
            if not segment.keys:
                self._drop_segment(segment)
        if self._index:
            log.info("disk tier: %d blocks in %d segments", len(self._index), len(self._segments))

    def _scan(self, segment: _Segment, end: int) -> None:
        scan = segment.format.scan(segment.fd, end)
        for start, stop in scan.damaged:
            self._fail(f"{segment.path.name}@{start}: damaged record, {stop - start} bytes skipped")
        for offset, header in scan.records:
            if header.kind != LIVE:
                continue
            meta_raw = os.pread(segment.fd, header.meta_len, offset + HEADER)
            try:
                meta = decode_meta(meta_raw, header.size)
            except (ValueError, TypeError) as exc:
                self._fail(f"{segment.path.name}@{offset}: bad metadata: {exc}")
                continue
            old = self._index.get(header.key)
            if old is not None:  # a later copy (carried forward) wins
                self._forget(header.key, old, moved=True)
            entry = _Entry(header.key, segment, offset, meta, meta_raw, header.body_hash)
            self._index[header.key] = entry
            segment.keys.add(header.key)
            segment.live += header.length
            self._stats.blocks += 1
            self._stats.bytes += header.length
            self._stats.payload_bytes += header.size
        if scan.end < end:
            log.warning(
                "disk tier: %s: cut %d torn bytes at %d",
                segment.path.name,
                end - scan.end,
                scan.end,
            )
            os.ftruncate(segment.fd, scan.end)
        segment.size = scan.end

    def _new_segment(self) -> _Segment:
        self._last_id += 1
        segment_id = self._last_id
        path = self.directory / f"seg-{segment_id:08d}.kvs"
        form, first_page = SegmentFormat.create()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.pwrite(fd, first_page, 0)
        if self.fsync != "never":  # the file's name too must survive a crash of the machine
            _sync_directory(self.directory)
        try:
            direct = os.open(path, os.O_WRONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else -1
        except OSError:  # a file system without direct I/O: write through the page cache
            direct = -1
        segment = _Segment(segment_id, path, fd, form, direct)
        with self._lock:
            self._segments[segment_id] = segment
            self._total += PAGE
        return segment

    def _forget(self, key: BlockKey, entry: _Entry, *, moved: bool = False) -> None:
        """Drop `key` from the index (lock held); `moved`: a newer copy takes its place."""
        del self._index[key]
        if not moved:
            self.changes.removed(key)
        entry.segment.keys.discard(key)
        entry.segment.live -= entry.length
        self._stats.blocks -= 1
        self._stats.bytes -= entry.length
        self._stats.payload_bytes -= entry.meta.size

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

    def _sync_segment(self, segment: _Segment) -> OSError | None:
        """fdatasync one segment; returns the error if it failed. Then the records past
        its last good sync may never reach the disk (the kernel may have dropped their
        pages): they leave the index, and count as lost, not as durable."""
        if self.fsync == "never":
            return None
        with self._lock:
            if segment.dropped:
                return None
            segment.readers += 1
            end = segment.size  # records written by now are covered by this sync
        error: OSError | None = None
        try:
            os.fdatasync(segment.fd)
        except OSError as exc:
            error = exc
        finally:
            lost = 0
            with self._lock:
                if error is None:
                    segment.synced = max(segment.synced, end)
                elif not segment.dropped:
                    lost = self._lose_unsynced(segment)
                segment.readers -= 1
                if segment.dropped and not segment.readers:
                    segment.close()
        if error is not None:
            self._write_error = error
            self._fail(f"syncing {segment.path.name}: {error} ({lost} unsynced blocks lost)")
        return error

    def _lose_unsynced(self, segment: _Segment) -> int:
        """Forget the records of `segment` past its last good sync (lock held)."""
        lost = [
            (key, entry)
            for key in segment.keys
            if (entry := self._index[key]).offset + entry.length > segment.synced
        ]
        for key, entry in lost:
            self._forget(key, entry)
        segment.synced = segment.size  # later writes follow the error: a later sync covers them
        self._drop_if_empty(segment)
        return len(lost)

    def _sync_every_second(self) -> None:
        while not self._stop.wait(1.0):
            self.sync()
            self.changes.report()  # records a failed sync lost

    def _fail(self, error: str, drop: _Entry | None = None) -> None:
        log.error("disk tier: %s", error)
        with self._lock:
            self._stats.errors += 1
            self._stats.last_error = error
            if drop is not None and self._index.get(drop.key) is drop:
                self._forget(drop.key, drop)
                self._drop_if_empty(drop.segment)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a segment named but not synced: its records will not be durable
        log.warning("disk tier: syncing %s: %s", directory, exc)
    finally:
        os.close(fd)


def _lock_directory(directory: Path) -> int:
    """Hold an exclusive lock on the directory for the tier's lifetime: two daemons
    appending to the same segments would lose each other's blocks."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DirectoryInUse(
            f"disk dir {directory} is in use by another kvstore-server (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
