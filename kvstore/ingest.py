"""Assembles a Put stream into whole blocks, whatever the transport.

A stream declares blocks (key + meta), then carries the concatenation of their
payloads cut into chunks anywhere. Each chunk is copied once, straight into the
block's reserved slot; a block is committed only when its last byte arrived, so
a stream that breaks leaves nothing partial behind.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import xxhash

from kvstore.errors import InvalidArgument, ResourceExhausted
from kvstore.keys import BlockKey, check_key
from kvstore.meta import BlockMeta
from kvstore.store import Store
from kvstore.tiers import Reservation


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: int
    existed: int


@dataclass(slots=True)
class _Current:
    index: int
    key: BlockKey
    meta: BlockMeta
    slot: Reservation | None  # None: key already present, bytes are discarded
    filled: int = 0


class BlockIngest:
    """Feed `declare` and `feed` in stream order, then `finish`; `abort` on any failure."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._declared: deque[tuple[int, BlockKey, BlockMeta]] = deque()
        self._seen: set[BlockKey] = set()
        self._current: _Current | None = None
        self._stored = 0
        self._existed = 0

    def declare(self, blocks: list[tuple[bytes, BlockMeta]]) -> None:
        """Validate and queue block headers; nothing is reserved yet."""
        for key, meta in blocks:
            index = len(self._seen)
            field = f"blocks[{index}]"
            key = check_key(key, f"{field}.key")
            if key in self._seen:
                raise InvalidArgument(f"{field}.key", f"repeats an earlier key ({key.hex()})")
            meta.validate(field, self._store.max_block_size)
            if meta.size > self._store.host.capacity:
                raise ResourceExhausted(
                    f"{field}.size: {meta.size} bytes exceeds the host tier"
                    f" ({self._store.host.capacity} bytes)"
                )
            self._seen.add(key)
            self._declared.append((index, key, meta))

    def feed(self, data: memoryview) -> None:
        """Copy the next bytes of the stream into their slots, committing whole blocks."""
        while data:
            current = self._current or self._next(len(data))
            n = min(current.meta.size - current.filled, len(data))
            if current.slot is not None:
                current.slot.view[current.filled : current.filled + n] = data[:n]  # the one copy
            current.filled += n
            data = data[n:]
            if current.filled == current.meta.size:
                self._complete(current)

    def finish(self) -> PutResult:
        """End of stream: every declared block must be whole."""
        if not self._seen:
            raise InvalidArgument("blocks", "empty batch: declare at least one block")
        if self._current is not None or self._declared:
            index, key, meta = (
                (self._current.index, self._current.key, self._current.meta)
                if self._current
                else self._declared[0]
            )
            filled = self._current.filled if self._current else 0
            raise InvalidArgument(
                f"blocks[{index}].size",
                f"stream ended after {filled} of {meta.size} bytes of block {key.hex()}",
            )
        return PutResult(self._stored, self._existed)

    def abort(self) -> None:
        """Drop the block in flight; blocks already committed stay (they are whole)."""
        if self._current is not None and self._current.slot is not None:
            self._store.abort(self._current.slot)
        self._current = None

    def _next(self, pending: int) -> _Current:
        if not self._declared:
            raise InvalidArgument("data", f"{pending} bytes beyond the declared blocks")
        index, key, meta = self._declared.popleft()
        slot = None if self._store.contains(key) else self._store.reserve(meta.size)
        self._current = _Current(index, key, meta, slot)
        return self._current

    def _complete(self, current: _Current) -> None:
        self._current = None
        if current.slot is None:
            self._existed += 1
            return
        if (
            current.meta.checksum
            and xxhash.xxh3_64_intdigest(current.slot.view) != current.meta.checksum
        ):
            self._store.abort(current.slot)
            raise InvalidArgument(
                f"blocks[{current.index}].checksum",
                f"payload of block {current.key.hex()} does not match its checksum",
            )
        if self._store.commit(current.key, current.meta, current.slot):
            self._stored += 1
        else:
            self._existed += 1
