"""Assembles a Put stream into whole blocks, whatever the transport.

A stream declares blocks (key + meta), then carries the concatenation of their
payloads, cut anywhere. `target()` is where the next bytes belong (the rest of
the block's reserved slot), so a socket can `recv_into` it and a framed
transport can copy a chunk into it: either way each byte is written once,
straight into place. A block is committed only when its last byte arrived, so
a stream that breaks, or that the node refuses part way, leaves nothing partial
behind: its whole blocks stay (a waiter sees each as it lands: other puts may have been
told they exist, so they are never taken back), and a refusal says how many there are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import xxhash

from kvstore.errors import InvalidArgument, ResourceExhausted, Unsupported
from kvstore.keys import BlockKey, check_key
from kvstore.limits import MAX_BLOCKS
from kvstore.meta import BlockMeta
from kvstore.results import PutResult
from kvstore.store import Store
from kvstore.tiers import Reservation

_SCRATCH = 1 << 20


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

    def __init__(
        self,
        store: Store,
        *,
        omit_present: bool = False,
        durable: bool = False,
    ) -> None:
        """`durable`: `finish` returns only once every block is on disk (see Store)."""
        if durable and store.disk is None:
            raise Unsupported("durable puts need a disk tier (--disk-dir)")
        self._store = store
        self._omit_present = omit_present
        self._durable = durable
        self._declared: deque[tuple[int, BlockKey, BlockMeta]] = deque()
        self._seen: set[BlockKey] = set()
        self._current: _Current | None = None
        self._scratch: memoryview | None = None
        self.pending_bytes = 0
        self.received = 0  # payload bytes taken in
        self._stored = 0
        self._existed = 0
        self._need = 0  # host-tier bytes the declared new blocks take

    def declare(self, blocks: list[tuple[bytes, BlockMeta]]) -> list[int]:
        """Validate and queue block headers; return the indices omitted as present."""
        if len(self._seen) + len(blocks) > MAX_BLOCKS:
            raise InvalidArgument("blocks", f"more than {MAX_BLOCKS} blocks in one request")
        omitted = []
        for key, meta in blocks:
            index = len(self._seen)
            key = validate_block(self._store, index, key, meta, self._seen)
            if self._omit_present and self._store.contains(key):
                self._existed += 1
                omitted.append(index)
                continue
            self._declared.append((index, key, meta))
            self._store.coming([key])
            self.pending_bytes += meta.size
            self._need += self._store.host.slot_cost(meta.size)
        check_fits(self._store, self._need, len(self._seen))
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
        assert current is not None, "advance() before target()"
        current.filled += n
        self.pending_bytes -= n
        self.received += n
        if current.filled == current.meta.size:
            self._complete(current)

    def feed(self, data: memoryview) -> None:
        """Copy the next bytes of the stream into place."""
        if len(data) > self.pending_bytes:  # refused before any of it lands
            excess = len(data) - self.pending_bytes
            raise InvalidArgument(
                "data", f"{excess} bytes beyond the declared blocks{self._kept()}"
            )
        while data:
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
            index, _, meta = (
                (current.index, current.key, current.meta) if current else self._declared[0]
            )
            filled = current.filled if current else 0
            raise InvalidArgument(
                f"blocks[{index}].size",
                f"stream ended after {filled} of {meta.size} bytes of block {index}" + self._kept(),
            )
        if self._durable:
            self._store.make_durable(list(self._seen))
        return PutResult(self._stored, self._existed)

    def abort(self) -> None:
        """Drop the block in flight; those declared and not received will not come:
        waiters for them stop waiting. Blocks already committed stay: they are whole."""
        if self._current is not None:
            if self._current.slot is not None:
                self._store.abort(self._current.slot)
            self._store.not_coming([self._current.key], failed=True)
        self._current = None
        self._store.not_coming([key for _, key, _ in self._declared], failed=True)
        self._declared.clear()

    def _kept(self) -> str:
        """What a refusal part way says of the blocks that stay."""
        whole = self._stored + self._existed
        return f" (the {whole} whole blocks before it are stored)" if whole else ""

    def _next(self) -> _Current:
        if not self._declared:
            raise InvalidArgument("data", "bytes beyond the declared blocks")
        index, key, meta = self._declared.popleft()
        try:
            slot = None
            if not self._store.contains(key):
                slot = self._store.reserve(meta.size)
        except BaseException:  # no room in time: this key will not come (`abort` the rest)
            self._store.not_coming([key], failed=True)
            raise
        self._current = _Current(index, key, meta, slot)
        return self._current

    def _complete(self, current: _Current) -> None:
        self._current = None
        if current.slot is None:  # found already there
            self._store.not_coming([current.key])
            self._existed += 1
            return
        try:
            check_payload(current.index, current.key, current.meta, current.slot.view)
        except InvalidArgument as exc:
            self._store.abort(current.slot)
            self._store.not_coming([current.key], failed=True)
            raise InvalidArgument(exc.field, exc.reason + self._kept()) from None
        try:
            stored = self._store.commit(current.key, current.meta, current.slot)
        except BaseException:
            self._store.not_coming([current.key], failed=True)
            raise
        self._store.not_coming([current.key])  # once stored: a waiter then finds it
        if stored:
            self._stored += 1
        else:
            self._existed += 1


class SlotPut:
    """A put whose slots are all reserved up front and written by someone else (a
    same-host client, through the shared arena), then published together.

    Blocks already present are acknowledged and get no slot. `commit` publishes
    every slot once all match their checksums; `abort` frees them all.
    """

    def __init__(
        self, store: Store, blocks: list[tuple[bytes, BlockMeta]], durable: bool = False
    ) -> None:
        if durable and store.disk is None:
            raise Unsupported("durable puts need a disk tier (--disk-dir)")
        self._store = store
        self._durable = durable
        self._present_keys: list[BlockKey] = []  # a durable put makes these durable too
        self.present: list[int] = []
        self.slots: list[tuple[int, BlockKey, BlockMeta, Reservation]] = []
        if len(blocks) > MAX_BLOCKS:
            raise InvalidArgument("blocks", f"more than {MAX_BLOCKS} blocks in one request")
        seen: set[BlockKey] = set()
        wanted = []
        for index, (key, meta) in enumerate(blocks):
            key = validate_block(store, index, key, meta, seen)
            if store.contains(key):
                self.present.append(index)
                self._present_keys.append(key)
            else:
                wanted.append((index, key, meta))
        sizes = [meta.size for *_, meta in wanted]
        check_fits(store, sum(store.host.slot_cost(size) for size in sizes), len(blocks))
        reservations = store.reserve_many(sizes)
        self.slots = [(*block, slot) for block, slot in zip(wanted, reservations, strict=True)]
        store.coming([key for _, key, _ in wanted])

    def commit(self, checksums: Sequence[int] = (), *, unhashed: bool = False) -> PutResult:
        """Publish every slot, or none: a checksum mismatch frees them all, then raises.
        `checksums`: those of the slots, in order, if learnt only once they were written;
        `unhashed`: the blocks came with none (GPU memory): they get theirs here, once."""
        slots, self.slots = self.slots, []
        try:
            if checksums and unhashed:
                raise InvalidArgument("checksums", "sent for blocks the node is to hash")
            if unhashed:
                slots = [
                    (index, key, replace(meta, checksum=xxhash.xxh3_64_intdigest(slot.view)), slot)
                    for index, key, meta, slot in slots
                ]
            if checksums:
                if len(checksums) != len(slots):
                    raise InvalidArgument(
                        "checksums", f"{len(checksums)} for {len(slots)} reserved blocks"
                    )
                slots = [
                    (index, key, replace(meta, checksum=checksum), slot)
                    for (index, key, meta, slot), checksum in zip(slots, checksums, strict=True)
                ]
            for index, key, meta, slot in [] if unhashed else slots:
                check_payload(index, key, meta, slot.view)
        except InvalidArgument:
            self._end(slots)
            raise
        stored = self._store.commit_many([(key, meta, slot) for _, key, meta, slot in slots])
        self._store.not_coming([key for _, key, _, _ in slots])
        if self._durable:  # the blocks already present too: maybe only in DRAM
            self._store.make_durable(self._present_keys + [key for _, key, _, _ in slots])
        return PutResult(stored, len(self.present) + len(slots) - stored)

    def abort(self) -> None:
        slots, self.slots = self.slots, []
        self._end(slots)

    def _end(self, slots: list[tuple[int, BlockKey, BlockMeta, Reservation]]) -> None:
        """Free the slots; their keys will not come."""
        for *_, slot in slots:
            self._store.abort(slot)
        self._store.not_coming([key for _, key, _, _ in slots], failed=True)


def validate_block(
    store: Store, index: int, key: bytes, meta: BlockMeta, seen: set[BlockKey]
) -> BlockKey:
    """Check one declared block of a batch; `seen` collects the batch's keys."""
    field = f"blocks[{index}]"
    key = check_key(key, f"{field}.key")
    if key in seen:
        raise InvalidArgument(f"{field}.key", "repeats an earlier key of the batch")
    meta.validate(field, store.max_block_size)
    if meta.size > store.host.capacity:
        raise ResourceExhausted(
            f"{field}.size: {meta.size} bytes exceeds the host tier ({store.host.capacity} bytes)"
        )
    seen.add(key)
    return key


def check_fits(store: Store, need: int, blocks: int) -> None:
    """A batch must fit the node whole: otherwise its last blocks would evict its first."""
    if need > store.capacity:
        raise ResourceExhausted(
            f"blocks: {blocks} blocks take {need} bytes of slots (a slot is at least 4 KiB), "
            f"more than its capacity of {store.capacity}: put them in smaller batches"
        )


def check_payload(index: int, key: BlockKey, meta: BlockMeta, payload: memoryview) -> None:
    if meta.checksum and xxhash.xxh3_64_intdigest(payload) != meta.checksum:
        raise InvalidArgument(
            f"blocks[{index}].checksum", "the payload does not match its checksum"
        )
