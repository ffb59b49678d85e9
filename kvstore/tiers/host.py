"""The host-DRAM tier: blocks in extents of one preallocated arena, LRU-evicted.

Guarantees:
- a block is visible only after `commit`, and only whole;
- a pinned block is never evicted or reused: a delete or eviction of a pinned
  block hides it at once and frees its bytes when the last reader unpins;
- when nothing can be evicted (everything pinned or reserved) a writer waits
  for space up to its timeout (back-pressure) instead of failing a reader;
- with `write_back`, a block is evictable only once it is clean (a copy is in
  the tier below): dirty blocks wait, oldest first, for `take_dirty`, and a
  writer that finds no room calls `on_pressure` so they are demoted sooner;
- capacity is accounted in what blocks really take (`slot_cost`): a page-aligned
  slot (so that slots go to disk by direct I/O and to a GPU by DMA, never through
  a bounce buffer: the smallest slot is one page) plus `BLOCK_OVERHEAD` for the
  block's index entry and metadata, so many tiny blocks cannot outgrow the tier.
One lock guards the index, LRU and arena; it is never held while bytes move.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.arena import HEADER, Arena, aligned
from kvstore.errors import Busy, ResourceExhausted
from kvstore.keys import BlockKey
from kvstore.limits import BLOCK_OVERHEAD, MAX_WAITING
from kvstore.lru import LRU
from kvstore.meta import BlockMeta
from kvstore.results import TierStats
from kvstore.tiers import Changes, PinnedBlock, Reservation, present_count


@dataclass(slots=True)
class _Slot:
    offset: int
    meta: BlockMeta
    pins: int = 0
    clean: bool = True
    hidden: bool = False  # deleted or evicted while pinned: freed on the last unpin


class HostTier:
    name = "host"

    def __init__(self, capacity: int, *, prefault: bool = True, write_back: bool = False) -> None:
        self.arena = Arena(capacity, prefault=prefault)
        self.capacity = self.arena.capacity
        self.write_back = write_back
        self.on_pressure: Callable[[], None] = lambda: None
        self._slots: dict[BlockKey, _Slot] = {}
        self._hidden: dict[BlockKey, list[_Slot]] = {}
        self._lru = LRU()  # clean, unpinned blocks: the legal victims
        self._dirty: dict[BlockKey, int] = {}  # key -> size, oldest first
        self.dirty_bytes = 0
        self._space = threading.Condition(threading.Lock())
        self._waiters = 0  # writers waiting for room
        self._stats = TierStats(self.name, capacity=self.capacity)
        self.changes = Changes(self.name)
        self.segment_token = os.urandom(16)
        self.arena.header[:16] = self.segment_token  # proof of sharing the host, for clients

    @property
    def segment_path(self) -> str | None:
        return self.arena.segment_path

    @staticmethod
    def slot_cost(size: int) -> int:
        """Bytes of capacity a block of `size` payload bytes takes here."""
        return aligned(size) + BLOCK_OVERHEAD

    @staticmethod
    def segment_offset(offset: int) -> int:
        """Where an arena offset lies in the shared segment a client maps."""
        return HEADER + offset

    def reserve(self, size: int, timeout: float) -> Reservation:
        """A write target of `size` bytes, evicting cold blocks as needed."""
        return self.reserve_many([size], timeout)[0]

    def reserve_many(self, sizes: Sequence[int], timeout: float) -> list[Reservation]:
        """Write targets for a batch, under one lock; all or none (ResourceExhausted)."""
        need = sum(self.slot_cost(size) for size in sizes)
        if need > self.capacity:
            raise ResourceExhausted(
                f"{len(sizes)} blocks need {need} bytes of the {self.name} tier (slots of at "
                f"least 4 KiB each, and {BLOCK_OVERHEAD} bytes of index per block); it holds "
                f"{self.capacity}"
            )
        deadline = time.monotonic() + timeout
        offsets: list[int] = []
        waiting = False
        with self._space:
            try:
                while len(offsets) < len(sizes):
                    if (offset := self._alloc(sizes[len(offsets)])) is not None:
                        offsets.append(offset)
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0 or (not waiting and self._waiters >= MAX_WAITING):
                        for offset, size in zip(offsets, sizes, strict=False):
                            self._release(offset, size)
                        refusal = Busy if left > 0 else ResourceExhausted  # others wait: busy
                        raise refusal(self._no_room(sizes[len(offsets)], timeout, left))
                    if not waiting:
                        waiting, self._waiters = True, self._waiters + 1
                    if self._dirty:
                        self.on_pressure()
                    self._space.wait(left)
            finally:
                self._waiters -= waiting
        self.changes.report()  # what it evicted for room
        return [
            Reservation(o, size, self.arena.view(o, size))
            for o, size in zip(offsets, sizes, strict=True)
        ]

    def _no_room(self, size: int, timeout: float, left: float) -> str:
        if left > 0:
            return (
                f"no room for {size} bytes in the {self.name} tier, and {MAX_WAITING} puts "
                "already wait for it: retry shortly"
            )
        return f"no room for {size} bytes in the {self.name} tier within {timeout:g}s: " + (
            self._held()
        )

    def _held(self) -> str:
        """What keeps the tier full, for an error message (lock held)."""
        hidden = sum(aligned(s.meta.size) for slots in self._hidden.values() for s in slots)
        visible = sum(aligned(s.meta.size) for s in self._slots.values())
        pinned = hidden + sum(aligned(s.meta.size) for s in self._slots.values() if s.pins)
        reserved = self.arena.used - visible - hidden
        return (
            f"{pinned} bytes pinned by readers, {self.dirty_bytes} not yet written to the tier "
            f"below, {reserved} reserved by puts in flight, of {self.capacity}"
        )

    def commit(
        self, key: BlockKey, meta: BlockMeta, reservation: Reservation, *, clean: bool = False
    ) -> bool:
        """Publish a reserved block. False (and the slot freed) if `key` was already present.

        `clean`: a copy already exists below (only matters with `write_back`).
        """
        return self.commit_many([(key, meta, reservation, clean)])[0]

    def commit_many(
        self, blocks: Sequence[tuple[BlockKey, BlockMeta, Reservation, bool]]
    ) -> list[bool]:
        """`commit` for a batch of (key, meta, reservation, clean), under one lock."""
        stored = []
        with self._space:
            for key, meta, reservation, clean in blocks:
                if (slot := self._slots.get(key)) is not None:
                    self._release(reservation.offset, reservation.size)
                    if slot.pins == 0 and slot.clean:
                        self._lru.on_hit(key)  # put again: in use, as a read would say
                    stored.append(False)
                    continue
                clean = clean or not self.write_back
                self._slots[key] = _Slot(reservation.offset, meta, clean=clean)
                if clean:
                    self._lru.on_put(key)
                else:
                    self._dirty[key] = meta.size
                    self.dirty_bytes += meta.size
                self._stats.blocks += 1
                self._stats.bytes += self.slot_cost(meta.size)
                self._stats.payload_bytes += meta.size
                self.changes.stored(key)
                stored.append(True)
            self._space.notify_all()  # new evictable blocks
        self.changes.report()
        return stored

    def abort(self, reservation: Reservation) -> None:
        with self._space:
            self._release(reservation.offset, reservation.size)

    def contains(self, key: BlockKey) -> bool:
        with self._space:
            return key in self._slots

    def present_prefix(self, keys: Sequence[BlockKey]) -> int:
        with self._space:
            return present_count(keys, self._slots)

    def pin_prefix(self, keys: Sequence[BlockKey]) -> list[PinnedBlock]:
        """Pin the leading present blocks of `keys`; each must be unpinned once."""
        pinned = []
        with self._space:
            for key in keys:
                slot = self._slots.get(key)
                if slot is None:
                    self._stats.misses += 1
                    break
                if slot.pins == 0:
                    self._lru.remove(key)
                slot.pins += 1
                view = self.arena.view(slot.offset, slot.meta.size)
                pinned.append(PinnedBlock(key, slot.meta, view, slot.offset))
            self._stats.hits += len(pinned)
        return pinned

    def take_dirty(self, max_bytes: int) -> list[PinnedBlock]:
        """Pin the oldest dirty blocks, up to `max_bytes` (at least one), for demotion."""
        taken: list[PinnedBlock] = []
        total = 0
        with self._space:
            while self._dirty and (not taken or total < max_bytes):
                key, size = next(iter(self._dirty.items()))
                del self._dirty[key]
                self.dirty_bytes -= size
                slot = self._slots[key]
                slot.pins += 1
                taken.append(
                    PinnedBlock(key, slot.meta, self.arena.view(slot.offset, size), slot.offset)
                )
                total += size
        return taken

    def take_dirty_keys(self, keys: Sequence[BlockKey]) -> list[PinnedBlock]:
        """`take_dirty` for these keys only (those still dirty): a durable put's."""
        taken = []
        with self._space:
            for key in keys:
                if (size := self._dirty.pop(key, None)) is None:
                    continue
                self.dirty_bytes -= size
                slot = self._slots[key]
                slot.pins += 1
                view = self.arena.view(slot.offset, size)
                taken.append(PinnedBlock(key, slot.meta, view, slot.offset))
        return taken

    def mark_clean(self, blocks: Sequence[PinnedBlock]) -> list[PinnedBlock]:
        """Record that `blocks` (from `take_dirty`) are copied below, and unpin them.

        Returns those deleted meanwhile, whose copy below must be deleted too.
        """
        gone = []
        with self._space:
            for block in blocks:
                slot = self._slots.get(block.key)
                if slot is not None and slot.offset == block.offset:
                    slot.clean = True
                    self._stats.demotions += 1
                else:
                    gone.append(block)
        for block in blocks:
            self.unpin(block)
        return gone

    def unpin(self, block: PinnedBlock) -> None:
        with self._space:
            slot = self._slots.get(block.key)
            if slot is not None and slot.offset == block.offset:
                slot.pins -= 1
                if slot.pins == 0 and slot.clean:
                    self._lru.on_put(block.key)  # just read: most recently used
                    self._space.notify_all()
                return
            hidden = self._hidden[block.key]
            slot = next(s for s in hidden if s.offset == block.offset)
            slot.pins -= 1
            if slot.pins == 0:
                hidden.remove(slot)
                if not hidden:
                    del self._hidden[block.key]
                self._release(slot.offset, slot.meta.size)

    def delete(self, keys: Sequence[BlockKey]) -> int:
        with self._space:
            present = [key for key in dict.fromkeys(keys) if key in self._slots]
            for key in present:
                self._drop(key)
        self.changes.report()
        return len(present)

    def listing(self) -> list[BlockKey]:
        with self._space:
            return list(self._slots)

    def stats(self) -> TierStats:
        with self._space:
            return self._stats.snapshot()

    def _alloc(self, size: int) -> int | None:
        """An extent for `size` bytes, evicting cold blocks for it; None if nothing more
        can be evicted (lock held)."""
        while not self._fits(size):  # the index counts against capacity too
            if self._evict() is None:
                return None
        offset = self.arena.alloc(size)
        while offset is None:
            hole = self._evict()
            if hole is None:
                return None
            offset = self.arena.alloc_in(hole, size)  # the hole the victim left, merged
        return offset

    def _fits(self, size: int) -> bool:
        return self.arena.used + self.slot_cost(size) + len(self._slots) * BLOCK_OVERHEAD <= (
            self.capacity
        )

    def _evict(self) -> tuple[int, int] | None:
        """Drop the coldest evictable block; the hole it leaves, or None if there is none."""
        victim = self._lru.victim()
        if victim is None:
            return None
        self._stats.evictions += 1
        return self._drop(victim)  # victims are unpinned: never None here

    def _drop(self, key: BlockKey) -> tuple[int, int] | None:
        """Remove `key` from the index; return the freed hole, or None if pinned or absent."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return None
        self._lru.remove(key)
        if (size := self._dirty.pop(key, None)) is not None:
            self.dirty_bytes -= size
        self._stats.blocks -= 1
        self._stats.bytes -= self.slot_cost(slot.meta.size)
        self._stats.payload_bytes -= slot.meta.size
        self.changes.removed(key)
        if slot.pins:
            slot.hidden = True
            self._hidden.setdefault(key, []).append(slot)
            return None
        return self._release(slot.offset, slot.meta.size)

    def _release(self, offset: int, size: int) -> tuple[int, int]:
        self._space.notify_all()
        return self.arena.release(offset, size)
