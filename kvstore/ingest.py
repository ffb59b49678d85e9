"""Assembles a Put stream into whole blocks, whatever the transport.

A stream declares blocks (key + meta), then carries the concatenation of their
payloads, cut anywhere. `target()` is where the next bytes belong (the rest of
the block's reserved slot), so a socket can `recv_into` it and a framed
transport can copy a chunk into it: either way each byte is written once,
straight into place. A block is committed only when its last byte arrived, so
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

_SCRATCH = 1 << 20


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
    """`declare`, then `target`/`advance` (or `feed`) in stream order, then `finish`;
    `abort` on any failure.

    With `omit_present`, blocks already stored when declared are acknowledged at
    once and expect no bytes (a negotiated transfer tells the sender to skip them).
    """

    def __init__(self, store: Store, *, omit_present: bool = False) -> None:
        self._store = store
        self._omit_present = omit_present
        self._declared: deque[tuple[int, BlockKey, BlockMeta]] = deque()
        self._seen: set[BlockKey] = set()
        self._current: _Current | None = None
        self._scratch: memoryview | None = None
        self.pending_bytes = 0
        self._stored = 0
        self._existed = 0

    def declare(self, blocks: list[tuple[bytes, BlockMeta]]) -> list[int]:
        """Validate and queue block headers; return the indices omitted as present."""
        omitted = []
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
            if self._omit_present and self._store.contains(key):
                self._existed += 1
                omitted.append(index)
                continue
            self._declared.append((index, key, meta))
            self.pending_bytes += meta.size
        return omitted

    def target(self) -> memoryview:
        """Writable memory for the next bytes of the stream (part of one block)."""
        current = self._current or self._next()
        want = current.meta.size - current.filled
        if current.slot is not None:
            return current.slot.view[current.filled :]
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        return self._scratch[: min(want, _SCRATCH)]

    def advance(self, n: int) -> None:
        """`n` bytes were written at the start of `target()`."""
        current = self._current
        current.filled += n
        self.pending_bytes -= n
        if current.filled == current.meta.size:
            self._complete(current)

    def feed(self, data: memoryview) -> None:
        """Copy the next bytes of the stream into place."""
        while data:
            if self.pending_bytes == 0:
                raise InvalidArgument("data", f"{len(data)} bytes beyond the declared blocks")
            target = self.target()
            n = min(len(target), len(data))
            target[:n] = data[:n]  # the one copy: frame -> slot
            self.advance(n)
            data = data[n:]

    def finish(self) -> PutResult:
        """End of stream: every declared block must be whole."""
        if not self._seen:
            raise InvalidArgument("blocks", "empty batch: declare at least one block")
        if self._current is not None or self._declared:
            current = self._current
            index, key, meta = (
                (current.index, current.key, current.meta) if current else self._declared[0]
            )
            filled = current.filled if current else 0
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

    def _next(self) -> _Current:
        if not self._declared:
            raise InvalidArgument("data", "bytes beyond the declared blocks")
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
