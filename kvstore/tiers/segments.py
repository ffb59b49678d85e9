"""The disk tier's file format: segment files of page-aligned records.

A segment file starts with one page naming its format and a random seed; records
follow, each starting on a page. A record is a 64-byte header, the block's
metadata and its payload: small records share one page, others have the payload
start on a page of its own, so it can go to disk from the (page-aligned) host
arena by direct I/O. The header holds the record's kind, key, lengths, a hash of
metadata + payload, and a hash of itself keyed with the segment's seed.

Recovery reads headers front to back. A header that fails its hash is one bad
record, not the end of the segment: the scan moves on to the next page that holds
a valid header. Since the seed never leaves the daemon, a payload cannot carry a
forged header that a scan would take for a record. Only a segment's incomplete
tail (no valid header after it, or a record running past the end) is cut.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import xxhash

from kvstore.keys import KEY_BYTES, BlockKey

PAGE = 4096
SEGMENT_MAGIC = b"KVSG"
RECORD_MAGIC = b"KVR2"
VERSION = 2
LIVE, DEAD = 0, 1
_SEGMENT = struct.Struct("<4sH2x16s")  # magic, version, seed; then an xxh3-64 of them
_HEAD = struct.Struct(f"<4sHHIQ{KEY_BYTES}sQ12x")  # magic version kind meta_len size key body
HEADER = _HEAD.size + 8  # then an xxh3-64 of the bytes before it, keyed with the seed
_SCAN_CHUNK = 1 << 20  # bytes read at a time when looking for the next valid header


def align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def layout(meta_len: int, size: int) -> tuple[int, int]:
    """(payload offset within the record, record length): small records fit one page."""
    if HEADER + meta_len + size <= PAGE:
        return HEADER + meta_len, PAGE
    head = align(HEADER + meta_len)
    return head, head + align(size)


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    key: BlockKey
    meta_len: int
    size: int
    body_hash: int

    @property
    def length(self) -> int:
        return layout(self.meta_len, self.size)[1]


@dataclass(slots=True)
class Scan:
    """What a segment holds: its records, damaged regions skipped, and where whole
    records end (an incomplete tail after that is to be cut)."""

    records: list[tuple[int, Header]] = field(default_factory=list)
    damaged: list[tuple[int, int]] = field(default_factory=list)  # (start, end)
    end: int = PAGE


def body_hash(meta_raw: bytes, payload: memoryview) -> int:
    h = xxhash.xxh3_64(meta_raw)
    h.update(payload)
    return h.intdigest()


class SegmentFormat:
    """Encodes and checks one segment's headers: hashes keyed with its seed."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self._seed = int.from_bytes(seed[:8], "little")

    @classmethod
    def create(cls) -> tuple[SegmentFormat, bytes]:
        """A fresh seed, and the first page of a new segment file naming it."""
        seed = os.urandom(16)
        head = _SEGMENT.pack(SEGMENT_MAGIC, VERSION, seed)
        page = head + xxhash.xxh3_64_digest(head)
        return cls(seed), page + bytes(PAGE - len(page))

    @classmethod
    def read(cls, first_page: bytes) -> SegmentFormat | None:
        """The format of a segment from its first page; None if foreign or damaged."""
        head = first_page[: _SEGMENT.size]
        if len(head) < _SEGMENT.size:
            return None
        if xxhash.xxh3_64_digest(head) != first_page[_SEGMENT.size : _SEGMENT.size + 8]:
            return None
        magic, version, seed = _SEGMENT.unpack(head)
        return cls(seed) if magic == SEGMENT_MAGIC and version == VERSION else None

    def encode(self, kind: int, key: BlockKey, meta_len: int, size: int, body: int) -> bytes:
        head = _HEAD.pack(RECORD_MAGIC, VERSION, kind, meta_len, size, key, body)
        return head + xxhash.xxh3_64_digest(head, seed=self._seed)

    def decode(self, raw: bytes | memoryview) -> Header | None:
        """The header in `raw`, or None for a torn, garbled or foreign one."""
        if len(raw) < HEADER or bytes(raw[:4]) != RECORD_MAGIC:
            return None
        head = bytes(raw[: _HEAD.size])
        if xxhash.xxh3_64_digest(head, seed=self._seed) != bytes(raw[_HEAD.size : HEADER]):
            return None
        _, version, kind, meta_len, size, key, body = _HEAD.unpack(head)
        if version != VERSION or kind not in (LIVE, DEAD) or HEADER + meta_len > 1 << 16:
            return None
        return Header(kind, key, meta_len, size, body)

    def scan(self, fd: int, end: int) -> Scan:
        """Every whole record of a segment file, in file order, from its first page on."""
        scan = Scan()
        offset = PAGE
        while offset + HEADER <= end:
            header = self.decode(os.pread(fd, HEADER, offset))
            if header is not None and offset + header.length <= end:
                scan.records.append((offset, header))
                offset += header.length
                continue
            following = self._next_valid(fd, offset + PAGE, end)
            if following is None:
                break  # nothing valid after it: an incomplete tail
            scan.damaged.append((offset, following))
            offset = following
        scan.end = min(offset, end)
        return scan

    def _next_valid(self, fd: int, start: int, end: int) -> int | None:
        """Offset of the first page at or after `start` that opens a whole valid record."""
        for chunk_at in range(start, end, _SCAN_CHUNK):
            chunk = os.pread(fd, min(_SCAN_CHUNK, end - chunk_at), chunk_at)
            for at in range(0, len(chunk), PAGE):
                if chunk[at : at + 4] != RECORD_MAGIC:
                    continue
                raw = chunk[at : at + HEADER]
                if len(raw) < HEADER:
                    raw = os.pread(fd, HEADER, chunk_at + at)
                header = self.decode(raw)
                if header is not None and chunk_at + at + header.length <= end:
                    return chunk_at + at
        return None
