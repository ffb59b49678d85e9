"""The Store: what the server calls. It owns policy (placement, demotion,
promotion, lookups); tiers own bytes.

Puts arrive in the host tier, where the network writes them in place. With a
device tier on top, each is then moved up while the device has room (its least
recently used blocks are moved down to the host tier to make it, when the host
has room at once), and a get of a device block copies it down for the transfer.
With a disk tier below, the host tier writes back: a demoter thread copies the oldest
blocks down once more than `dirty_ratio` of the host tier is not yet on disk,
or at once when a put finds no room; only blocks with a copy below are evicted,
so a full host tier slows puts down and never drops data. A get that misses the
host tier reads the block from disk into a host slot, kept there (promoted)
or freed when the transfer ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvstore.arena import aligned
from kvstore.errors import ResourceExhausted, Unsupported
from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.tiers import Listener, PinnedBlock, Reservation, Tier, TierStats
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

log = logging.getLogger("kvstore.store")

DEMOTE_BATCH = 64 << 20  # bytes written per demotion batch (and per fsync under `batch`)
MAINTAIN_EVERY = 1.0  # seconds without demotion before the disk tier compacts
FAILED_FOR = 30.0  # seconds a put that died is remembered by the keys it did not bring
FAILED_KEYS = 1 << 16  # such keys remembered at most (the oldest are forgotten first)


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    puts: int
    gets: int
    lookups: int
    uptime_s: float
    transfers: dict[str, int] = field(default_factory=dict)  # by "put/PATH"; filled by the server
    fallbacks: dict[str, int] = field(default_factory=dict)  # paths a client left; by the client
    fetched_blocks: dict[str, int] = field(default_factory=dict)  # pulled from other nodes, by id
    fetched_bytes: dict[str, int] = field(default_factory=dict)
    tenant: str = ""  # with tenants: the caller's, and its own usage and quota (0: none)
    tenant_blocks: int = 0
    tenant_bytes: int = 0
    quota: int = 0


class ReadBatch:
    """The present prefix of a Get, pinned until each block is released. `truncated`: it
    stopped before a key that is stored (no room in DRAM to bring it up, or a part limit),
    so the reader should ask again for the rest rather than take it for a miss."""

    def __init__(
        self,
        blocks: list[PinnedBlock],
        releases: list[Callable[[], None]],
        truncated: bool = False,
    ) -> None:
        self.blocks = blocks
        self.truncated = truncated
        self._held = {id(b): release for b, release in zip(blocks, releases, strict=True)}

    def release(self, block: PinnedBlock) -> None:
        """Let the tier evict `block` again; safe to call once the bytes are copied out."""
        if (release := self._held.pop(id(block), None)) is not None:
            release()

    def close(self) -> None:
        # last block first: a prompt's first blocks, which most requests share, end up
        # the most recently used
        for release in reversed(self._held.values()):
            release()
        self._held.clear()


class Store:
    def __init__(
        self,
        host: HostTier,
        *,
        max_block_size: int,
        reserve_timeout: float,
        disk: DiskTier | None = None,
        device: DeviceTier | None = None,
        dirty_ratio: float = 0.5,
        promote: bool = True,
    ) -> None:
        if disk is not None and not host.write_back:
            raise ValueError("a host tier above a disk tier must write back")
        self.host = host
        self.disk = disk
        self.device = device
        self.tiers: tuple[Tier, ...] = tuple(t for t in (device, host, disk) if t is not None)
        self._moves = threading.Lock()  # one device move at a time
        self.max_block_size = max_block_size
        self.reserve_timeout = reserve_timeout
        self.promote = promote
        self.dirty_limit = int(dirty_ratio * host.capacity)
        self._started = time.monotonic()
        self._listeners: list[Listener] = []
        self._arrivals = threading.Condition()  # notified when blocks arrive, or will not
        self._coming: Counter[BlockKey] = Counter()  # keys puts under way declared
        self._failed: OrderedDict[BlockKey, float] = OrderedDict()  # key -> when its put died
        for tier in self.tiers:
            tier.changes.listener = self._changed
        self._counts = {"puts": 0, "gets": 0, "lookups": 0, "promotions": 0}
        self._counts_lock = threading.Lock()
        self._demoter: threading.Thread | None = None
        self._writing: Counter[BlockKey] = Counter()  # keys taken to be written to disk now
        self._written = threading.Condition()  # notified when such a write ends
        self._wake = threading.Condition()
        self._pressure = self._stopping = False
        if disk is not None:
            host.on_pressure = self._on_pressure
            self._demoter = threading.Thread(
                target=self._demote_loop, name="kvstore-demoter", daemon=True
            )
            self._demoter.start()

    @property
    def capacity(self) -> int:
        """Bytes the node holds in all its tiers."""
        return sum(tier.capacity for tier in self.tiers)

    def contains(self, key: BlockKey) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def watch(self, listener: Listener) -> None:
        """Have `listener(tier, stored keys, removed keys)` told of every change of every
        tier, after the fact, outside the tiers' locks (it may ask the store anything)."""
        self._listeners.append(listener)

    def present(self, keys: Sequence[BlockKey]) -> int:
        """How many leading keys are held in any tier (counted in no statistic)."""
        n = self.host.present_prefix(keys)
        while n < len(keys) and len(self.tiers) > 1 and self.contains(keys[n]):
            n += 1
        return n

    def coming(self, keys: Sequence[BlockKey]) -> None:
        """A put declared these keys: they are on their way (`wait_present`), and an earlier
        put of them that died is forgotten."""
        with self._arrivals:
            self._coming.update(keys)
            for key in keys:
                self._failed.pop(key, None)

    def not_coming(self, keys: Sequence[BlockKey], failed: bool = False) -> None:
        """Those keys of a put that arrived, or (`failed`) will not any more: the put was
        aborted, failed or lost its sender. A failed put's keys are remembered for
        `FAILED_FOR` seconds, so that a wait that begins after it died ends at once too."""
        now = time.monotonic()
        with self._arrivals:
            for key in keys:
                if self._coming[key] <= 1:
                    self._coming.pop(key, None)
                else:
                    self._coming[key] -= 1
                if failed and not self.contains(key):  # (another put may have brought it)
                    self._failed[key] = now
                    self._failed.move_to_end(key)
            stale = now - FAILED_FOR
            while self._failed and (
                len(self._failed) > FAILED_KEYS or next(iter(self._failed.values())) < stale
            ):
                self._failed.popitem(last=False)  # the oldest first
            self._arrivals.notify_all()

    def abandoned(self, key: BlockKey) -> bool:
        """A put of `key` died in the last `FAILED_FOR` seconds without bringing it, and no
        put of it has started since: a consumer should not wait for it."""
        with self._arrivals:
            failed = self._failed.get(key)
            return (
                failed is not None
                and failed >= time.monotonic() - FAILED_FOR
                and key not in self._coming
                and not self.contains(key)
            )

    def wait_present(
        self, key: BlockKey, timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> bool:
        """Wait up to `timeout` seconds for `key` to be stored. Returns early, False, when a
        put that was bringing it ended without it (nothing else is known to be coming),
        before or during the wait (`abandoned`), or once `alive()`, asked every quarter
        second, says the waiter is gone. With no put of it known, it waits for one."""
        deadline = time.monotonic() + timeout
        was_coming = False
        with self._arrivals:  # re-entrant: `abandoned` takes it again
            while not self.contains(key):
                coming = key in self._coming
                left = deadline - time.monotonic()
                ended = (was_coming and not coming) or self.abandoned(key)
                if ended or left <= 0 or not alive():
                    return False
                was_coming |= coming
                self._arrivals.wait(min(left, 0.25))
        return True

    def _changed(self, tier: str, stored: list[BlockKey], removed: list[BlockKey]) -> None:
        if stored:
            with self._arrivals:
                for key in stored if self._failed else ():
                    self._failed.pop(key, None)  # here after all (a fetch, say)
                self._arrivals.notify_all()
        for listener in self._listeners:
            listener(tier, stored, removed)

    def fastest(self, keys: Sequence[BlockKey]) -> list[str | None]:
        """The fastest tier holding each key now, or None."""
        return [next((t.name for t in self.tiers if t.contains(k)), None) for k in keys]

    def listing(self) -> Iterator[tuple[BlockKey, str]]:
        """Every block held, with the fastest tier holding it (a snapshot per tier)."""
        seen: set[BlockKey] = set()
        for tier in self.tiers:
            for key in tier.listing():
                if key not in seen:
                    seen.add(key)
                    yield key, tier.name

    def reserve(self, size: int) -> Reservation:
        """A private slot for a block's bytes; waits for space up to `reserve_timeout`."""
        return self.host.reserve(size, self.reserve_timeout)

    def commit(self, key: BlockKey, meta: BlockMeta, reservation: Reservation) -> bool:
        """Make a whole block visible; False if the key was already present."""
        if self.device is not None:
            if self.device.contains(key):
                self.host.abort(reservation)
                return False
            if self._up_to_device(key, meta, reservation):
                self.host.abort(reservation)
                self._count("puts", 1)
                return True
        stored = self.host.commit(key, meta, reservation, clean=self._on_disk(key))
        self._count("puts", int(stored))
        if self.host.dirty_bytes > self.dirty_limit:
            self._kick()
        return stored

    def reserve_many(self, sizes: Sequence[int]) -> list[Reservation]:
        """`reserve` for a batch: all or none."""
        return self.host.reserve_many(sizes, self.reserve_timeout)

    def commit_many(self, blocks: Sequence[tuple[BlockKey, BlockMeta, Reservation]]) -> int:
        """`commit` for a batch; returns how many were new."""
        if self.device is not None:
            return sum(self.commit(*block) for block in blocks)
        stored = sum(
            self.host.commit_many([(k, meta, slot, self._on_disk(k)) for k, meta, slot in blocks])
        )
        self._count("puts", stored)
        if self.host.dirty_bytes > self.dirty_limit:
            self._kick()
        return stored

    def abort(self, reservation: Reservation) -> None:
        self.host.abort(reservation)

    def lookup(self, keys: Sequence[BlockKey]) -> list[str]:
        """Tier name of each block of the longest present prefix of `keys` (highest copy)."""
        self._count("lookups", 1)
        names = [self.host.name] * self.host.present_prefix(keys)
        for key in keys[len(names) :] if len(self.tiers) > 1 else ():
            tier = next((t for t in self.tiers if t.contains(key)), None)
            if tier is None:
                break
            names.append(tier.name)
        return names

    def pin(self, keys: Sequence[BlockKey]) -> ReadBatch:
        """Pin the present prefix of `keys`; the caller must close the batch."""
        blocks = self.host.pin_prefix(keys)
        if self.disk is not None and blocks:
            self.disk.touch([b.key for b in blocks])  # hot: outlives its disk segment
        releases: list[Callable[[], None]] = [self._unpinner(b) for b in blocks]
        while len(blocks) < len(keys) and len(self.tiers) > 1:
            key = keys[len(blocks)]
            if pinned := self.host.pin_prefix([key]):
                found = [(pinned[0], self._unpinner(pinned[0]))]
            elif not (found := self._from_device(keys[len(blocks) :])):
                if (one := self._from_disk(key)) is None:
                    break
                found = [one]
            blocks += [block for block, _ in found]
            releases += [release for _, release in found]
        self._count("gets", len(blocks))
        truncated = len(blocks) < len(keys) and self.contains(keys[len(blocks)])
        return ReadBatch(blocks, releases, truncated)

    @contextmanager
    def read(self, keys: Sequence[BlockKey]) -> Iterator[ReadBatch]:
        """Pin the present prefix of `keys` for the duration of a transfer."""
        batch = self.pin(keys)
        try:
            yield batch
        finally:
            batch.close()

    def delete(self, keys: Sequence[BlockKey]) -> int:
        present = [key for key in dict.fromkeys(keys) if self.contains(key)]
        for tier in self.tiers:
            tier.delete(present)
        return len(present)

    def make_durable(self, keys: Sequence[BlockKey]) -> None:
        """What a durable put waits for before it is acknowledged: every one of `keys` has
        its record on disk, synced under the fsync policy (`DiskTier.persist`). Blocks
        the demoter is writing are waited for, then checked; those still only in DRAM or
        on the device (dirty, or a write that failed) are written here. Raises
        ResourceExhausted (disk full) or Unavailable, naming the disk, if any is not."""
        if self.disk is None:
            raise Unsupported("durable puts need a disk tier (--disk-dir)")
        keys = list(dict.fromkeys(keys))
        with self._written:  # a write under way ends with its outcome on record
            self._written.wait_for(lambda: not any(key in self._writing for key in keys))
        taken = self.host.take_dirty_keys(keys)
        self._begin_writing(taken)
        pinned: list[PinnedBlock] = []
        try:
            blocks = [(b.key, b.meta, b.view) for b in taken]
            have = {b.key for b in taken}
            for key in keys:  # not dirty, yet not on disk: a failed write, the device, a race
                found = None if key in have or self.disk.contains(key) else self._durable_copy(key)
                if found is not None:
                    blocks.append(found[0])
                    pinned += found[1]
            self.disk.persist(blocks, keys)
        finally:
            gone = self.host.mark_clean(taken)
            for block in pinned:
                self.host.unpin(block)
            self._end_writing(taken)
            if gone:  # deleted meanwhile: the delete wins
                self.disk.delete([b.key for b in gone if not self.host.contains(b.key)])

    def _durable_copy(
        self, key: BlockKey
    ) -> tuple[tuple[BlockKey, BlockMeta, memoryview], list[PinnedBlock]] | None:
        """`key`'s bytes from DRAM (pinned: unpin them after) or the device, or None."""
        if pinned := self.host.pin_prefix([key]):
            return (key, pinned[0].meta, pinned[0].view), pinned
        if self.device is None:
            return None
        if copy := self._device_copy(key):
            return copy, []
        if pinned := self.host.pin_prefix([key]):  # moved down from the device meanwhile
            return (key, pinned[0].meta, pinned[0].view), pinned
        return None

    def _begin_writing(self, blocks: Sequence[PinnedBlock]) -> None:
        with self._written:
            self._writing.update(b.key for b in blocks)

    def _end_writing(self, blocks: Sequence[PinnedBlock]) -> None:
        if not blocks:
            return
        with self._written:
            self._writing.subtract(b.key for b in blocks)
            for block in blocks:
                if self._writing[block.key] <= 0:
                    del self._writing[block.key]
            self._written.notify_all()

    def stats(self) -> StoreStats:
        with self._counts_lock:
            counts = dict(self._counts)
        tiers = tuple(tier.stats() for tier in self.tiers)
        promotions = counts.pop("promotions")
        if self.disk is not None:
            tiers[-1].promotions = promotions
        return StoreStats(tiers=tiers, uptime_s=time.monotonic() - self._started, **counts)

    def close(self, *, persist: bool = False) -> None:
        """Stop demoting; with `persist`, first write every device and host block to disk."""
        if persist and self.device is not None and self.disk is not None:
            self._device_to_disk()
        if self._demoter is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._demoter.join()
        self._demoter = None
        if persist:
            while self._demote_batch():
                pass
        self.disk.close()

    # -- demotion and promotion -------------------------------------------

    def _on_pressure(self) -> None:
        """A put is waiting for room: demote now, whatever the dirty ratio."""
        self._pressure = True
        self._kick()

    def _kick(self) -> None:
        with self._wake:
            self._wake.notify()

    def _demote_loop(self) -> None:
        while True:
            with self._wake:
                due = self._wake.wait_for(
                    lambda: self._stopping or self._must_demote(), timeout=MAINTAIN_EVERY
                )
                if self._stopping:
                    return
                self._pressure = False
            if due:
                self._demote_batch()
            else:  # idle: give back the disk space of deleted blocks
                self.disk.maintain()

    def _must_demote(self) -> bool:
        dirty = self.host.dirty_bytes
        return dirty > self.dirty_limit or (self._pressure and dirty > 0)

    def _demote_batch(self) -> bool:
        """Copy the oldest dirty host blocks to disk; False when there were none."""
        blocks = self.host.take_dirty(DEMOTE_BATCH)
        if not blocks:
            return False
        self._begin_writing(blocks)  # a durable put of these waits for the outcome
        try:  # a block whose write fails is logged and counted by the disk tier
            self.disk.append([(b.key, b.meta, b.view) for b in blocks])
        finally:
            gone = self.host.mark_clean(blocks)
            self._end_writing(blocks)
        if gone:  # deleted while being written down: delete the copy too
            self.disk.delete([b.key for b in gone if not self.host.contains(b.key)])
        return True

    def _up_to_device(self, key: BlockKey, meta: BlockMeta, reservation: Reservation) -> bool:
        """Move a just-received block up to the device, if room can be made without waiting."""
        if meta.size > self.device.capacity or self.contains(key):
            return False
        with self._moves:
            victims = self.device.victims(meta.size)
            if victims and not self._device_to_host(victims):
                return False
            try:
                return self.device.put_batch([(key, meta, reservation.view)]) == 1
            except ResourceExhausted:  # fragmented: the block stays in the host tier
                return False

    def _device_to_host(self, victims: list[tuple[BlockKey, BlockMeta]]) -> bool:
        """Move blocks down into DRAM to make room on the device; False if no room now."""
        moved = self._copy_down([k for k, _ in victims], [m.size for _, m in victims], hit=False)
        if moved is None:
            return False
        for (key, _), (meta, slot) in zip(victims, moved, strict=False):
            self.host.commit(key, meta, slot, clean=self._on_disk(key))
        self.device.delete([k for k, _ in victims], demoted=True)
        return True

    def _from_device(
        self, keys: Sequence[BlockKey]
    ) -> list[tuple[PinnedBlock, Callable[[], None]]]:
        """Copy the run of device blocks leading `keys` down into host slots for a transfer."""
        if self.device is None:
            return []
        sizes: list[int] = []
        for key in keys[: self.device.present_prefix(keys)]:
            meta = self.device.meta(key)
            if meta is None or (sizes and sum(sizes) + meta.size > self.host.capacity // 4):
                break  # the rest on a later turn: a transfer must not need all of DRAM
            sizes.append(meta.size)
        with self._moves:
            moved = self._copy_down(keys[: len(sizes)], sizes, hit=True) if sizes else None
        return [
            (PinnedBlock(key, meta, slot.view[: meta.size], slot.offset), self._aborter(slot))
            for key, (meta, slot) in zip(keys, moved or [], strict=False)
        ]

    def _copy_down(
        self, keys: Sequence[BlockKey], sizes: list[int], *, hit: bool
    ) -> list[tuple[BlockMeta, Reservation]] | None:
        """Device blocks copied into one fresh host extent (one copy when the device side
        is contiguous): (meta, slot) of those still there, or None if DRAM has no room now."""
        try:
            slots = self._host_slots(sizes)
        except ResourceExhausted:
            return None
        metas = self.device.read_batch(keys, [s.view for s in slots], hit=hit)
        for slot in slots[len(metas) :]:
            self.host.abort(slot)
        return list(zip(metas, slots, strict=False))

    def _on_disk(self, key: BlockKey) -> bool:
        return self.disk is not None and self.disk.contains(key)

    def _host_slots(self, sizes: list[int]) -> list[Reservation]:
        """One host extent for `sizes`, cut into back-to-back slots; raises if no room now."""
        whole = self.host.reserve(sum(aligned(size) for size in sizes), 0)
        slots, at = [], 0
        for size in sizes:
            slots.append(
                Reservation(whole.offset + at, size, self.host.arena.view(whole.offset + at, size))
            )
            at += aligned(size)
        return slots

    def _device_to_disk(self) -> None:
        """On a persisting shutdown: write every device block down to disk."""
        for key in self.device.listing():
            self._device_block_to_disk(key)

    def _device_block_to_disk(self, key: BlockKey) -> None:
        if (copy := self._device_copy(key)) is not None:
            self.disk.append([copy])

    def _device_copy(self, key: BlockKey) -> tuple[BlockKey, BlockMeta, memoryview] | None:
        """A copy of a device block in fresh memory, or None if it is not there."""
        meta = self.device.meta(key)
        if meta is None:
            return None
        buffer = memoryview(bytearray(meta.size))
        if not self.device.read_batch([key], [buffer], hit=False):
            return None
        return key, meta, buffer

    def _aborter(self, slot: Reservation) -> Callable[[], None]:
        return lambda: self.host.abort(slot)

    def _from_disk(self, key: BlockKey) -> tuple[PinnedBlock, Callable[[], None]] | None:
        """Read `key` from disk into a host slot and pin it there, or None if absent."""
        meta = self.disk.meta(key)
        if meta is None:
            return None
        # Wait only for dirty blocks to be written down: what else blocks room
        # may be this very batch's pins.
        timeout = self.reserve_timeout if self.host.dirty_bytes else 0
        try:
            slot = self.host.reserve(meta.size, timeout)
        except ResourceExhausted:
            return None
        meta = self.disk.read_into(key, slot.view)
        if meta is None:
            self.host.abort(slot)
            return None
        if not self.promote:
            block = PinnedBlock(key, meta, slot.view[: meta.size], slot.offset)
            return block, lambda: self.host.abort(slot)
        self.host.commit(key, meta, slot, clean=True)
        self._count("promotions", 1)
        pinned = self.host.pin_prefix([key])  # a racing put may have won: pin whichever is there
        return (pinned[0], self._unpinner(pinned[0])) if pinned else None

    def _unpinner(self, block: PinnedBlock) -> Callable[[], None]:
        return lambda: self.host.unpin(block)

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n
