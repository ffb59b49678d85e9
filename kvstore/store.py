"""The Store: what the server calls. It owns policy (placement, demotion,
promotion, lookups); tiers own bytes.

Its tiers are one list, fastest first (kvstore/tiers/base.py): an accelerator tier,
the host tier, backing tiers; blocks move between neighbours in that list. Puts arrive
in the host tier, where the network writes them in place. With an accelerator tier on
top, each is then moved up while it has room (its least recently used blocks are moved
down to the host tier to make it, when the host has room at once), and a get of an
accelerator block copies it down for the transfer. With backing tiers below, the host
tier writes back: a demoter thread copies the oldest blocks to the first backing tier
once more than `dirty_ratio` of the host tier has no copy there, or at once when a put
finds no room; only blocks with a copy below are evicted, so a full host tier slows puts
down and never drops data. A get that misses the host tier reads the run of blocks it
needs from the fastest backing tier holding it, in one batch on a promotion thread, into
host slots, kept there (promoted) or freed when the transfer ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from kvstore.arena import aligned
from kvstore.errors import ResourceExhausted, Unsupported
from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.results import StoreStats
from kvstore.tiers import Listener, PinnedBlock, Reservation
from kvstore.tiers.base import AcceleratorTier, BackingTier, MemoryTier, Tier

log = logging.getLogger("kvstore.store")

DEMOTE_BATCH = 64 << 20  # bytes written per demotion batch (and per fsync under `batch`)
MAINTAIN_EVERY = 1.0  # seconds without demotion before the backing tiers compact
PROMOTERS = 4  # threads reading runs of blocks up from the backing tiers for gets
READ_TIMEOUT = 30.0  # seconds a get waits for such a read (beyond waiting for room)
FAILED_FOR = 30.0  # seconds a put that died is remembered by the keys it did not bring
FAILED_KEYS = 1 << 16  # such keys remembered at most (the oldest are forgotten first)


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


Found = list[tuple[PinnedBlock, Callable[[], None]]]  # blocks pinned for a read, and releases


class Store:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        max_block_size: int,
        reserve_timeout: float,
        dirty_ratio: float = 0.5,
        promote: bool = True,
    ) -> None:
        """`tiers`: fastest first; see kvstore/tiers/base.py."""
        self.tiers = tuple(tiers)
        self.host, self._upper, self._below = _roles(self.tiers)
        self.disk = self._below[0] if self._below else None  # written back to, made durable in
        self._moves = threading.Lock()  # one accelerator move at a time
        self.max_block_size = max_block_size
        self.reserve_timeout = reserve_timeout
        self.promote = promote
        self.dirty_limit = int(dirty_ratio * self.host.capacity)
        self._started = time.monotonic()
        self._listeners: list[Listener] = []
        self._arrivals = threading.Condition()  # notified when blocks arrive, or will not
        self._coming: Counter[BlockKey] = Counter()  # keys puts under way declared
        self._failed: OrderedDict[BlockKey, float] = OrderedDict()  # key -> when its put died
        for tier in self.tiers:
            tier.changes.listener = self._changed
        self._counts = {"puts": 0, "gets": 0, "lookups": 0}
        self._promoted: Counter[Tier] = Counter()  # blocks brought up from each backing tier
        self._counts_lock = threading.Lock()
        self._demoter: threading.Thread | None = None
        # threads start on the first promotion: none without a backing tier
        self._promoter = ThreadPoolExecutor(PROMOTERS, thread_name_prefix="kvstore-promote")
        self._writing: Counter[BlockKey] = Counter()  # keys taken to be written to disk now
        self._written = threading.Condition()  # notified when such a write ends
        self._wake = threading.Condition()
        self._pressure = self._stopping = False
        if self._below:
            self.host.on_pressure = self._on_pressure
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
        if self._upper is not None:
            if self._upper.contains(key):
                self.host.abort(reservation)
                return False
            if self._up(key, meta, reservation):
                self.host.abort(reservation)
                self._count("puts", 1)
                return True
        stored = self.host.commit(key, meta, reservation, clean=self._held_below(key))
        self._count("puts", int(stored))
        if self.host.dirty_bytes > self.dirty_limit:
            self._kick()
        return stored

    def reserve_many(self, sizes: Sequence[int]) -> list[Reservation]:
        """`reserve` for a batch: all or none."""
        return self.host.reserve_many(sizes, self.reserve_timeout)

    def commit_many(self, blocks: Sequence[tuple[BlockKey, BlockMeta, Reservation]]) -> int:
        """`commit` for a batch; returns how many were new."""
        if self._upper is not None:
            return sum(self.commit(*block) for block in blocks)
        stored = sum(
            self.host.commit_many(
                [(k, meta, slot, self._held_below(k)) for k, meta, slot in blocks]
            )
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
        for tier in self._below if blocks else ():
            tier.touch([b.key for b in blocks])  # hot: outlives its disk segment
        releases: list[Callable[[], None]] = [self._unpinner(b) for b in blocks]
        while len(blocks) < len(keys) and len(self.tiers) > 1:
            rest = keys[len(blocks) :]
            arrived = [(b, self._unpinner(b)) for b in self.host.pin_prefix(rest[:1])]
            found = arrived or self._from_upper(rest) or self._from_below(rest)
            if not found:
                break
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
        its record in the first backing tier, synced under its policy (`persist`). Blocks
        the demoter is writing are waited for, then checked; those still only in DRAM or
        on the accelerator (dirty, or a write that failed) are written here. Raises
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
        """`key`'s bytes from DRAM (pinned: unpin them after) or the accelerator, or None."""
        if pinned := self.host.pin_prefix([key]):
            return (key, pinned[0].meta, pinned[0].view), pinned
        if self._upper is None:
            return None
        if copy := self._upper_copy(key):
            return copy, []
        if pinned := self.host.pin_prefix([key]):  # moved down from the accelerator meanwhile
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
            counts, promoted = dict(self._counts), dict(self._promoted)
        tiers = tuple(tier.stats() for tier in self.tiers)
        for tier, stats in zip(self.tiers, tiers, strict=True):
            stats.promotions += promoted.get(tier, 0)
        return StoreStats(
            tiers=tiers,
            puts=counts["puts"],
            gets=counts["gets"],
            lookups=counts["lookups"],
            uptime_s=time.monotonic() - self._started,
        )

    def close(self, *, persist: bool = False) -> None:
        """Stop demoting; with `persist`, first write every accelerator and host block down."""
        if persist and self._upper is not None and self.disk is not None:
            self._upper_to_disk()
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
        self._promoter.shutdown()
        for tier in self._below:
            tier.close()

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
            else:  # idle: give back the space of deleted blocks
                for tier in self._below:
                    tier.maintain()

    def _must_demote(self) -> bool:
        dirty = self.host.dirty_bytes
        return dirty > self.dirty_limit or (self._pressure and dirty > 0)

    def _demote_batch(self) -> bool:
        """Copy the oldest dirty host blocks down; False when there were none."""
        assert self.disk is not None  # the demoter runs only above a backing tier
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

    def _up(self, key: BlockKey, meta: BlockMeta, reservation: Reservation) -> bool:
        """Move a just-received block up, if room can be made without waiting."""
        assert self._upper is not None
        if meta.size > self._upper.capacity or self.contains(key):
            return False
        with self._moves:
            victims = self._upper.victims(meta.size)
            if victims and not self._upper_to_host(victims):
                return False
            try:
                return self._upper.put_batch([(key, meta, reservation.view)]) == 1
            except ResourceExhausted:  # fragmented: the block stays in the host tier
                return False

    def _upper_to_host(self, victims: list[tuple[BlockKey, BlockMeta]]) -> bool:
        """Move blocks down into DRAM to make room above; False if no room now."""
        assert self._upper is not None
        moved = self._copy_down([k for k, _ in victims], [m.size for _, m in victims], hit=False)
        if moved is None:
            return False
        for (key, _), (meta, slot) in zip(victims, moved, strict=False):
            self.host.commit(key, meta, slot, clean=self._held_below(key))
        self._upper.delete([k for k, _ in victims], demoted=True)
        return True

    def _from_upper(self, keys: Sequence[BlockKey]) -> Found:
        """Copy the run of accelerator blocks leading `keys` down into host slots for a
        transfer."""
        if self._upper is None:
            return []
        sizes: list[int] = []
        for key in keys[: self._upper.present_prefix(keys)]:
            meta = self._upper.meta(key)
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
        """Accelerator blocks copied into one fresh host extent (one copy when the blocks lie
        together above): (meta, slot) of those still there, or None if DRAM has no room now."""
        assert self._upper is not None
        try:
            slots = self._host_slots(sizes)
        except ResourceExhausted:
            return None
        metas = self._upper.read_batch(keys, [s.view for s in slots], hit=hit)
        for slot in slots[len(metas) :]:
            self.host.abort(slot)
        return list(zip(metas, slots, strict=False))

    def _held_below(self, key: BlockKey) -> bool:
        return any(tier.contains(key) for tier in self._below)

    def _host_slots(self, sizes: list[int]) -> list[Reservation]:
        """One host extent for `sizes`, cut into back-to-back slots; raises if no room now."""
        whole = self.host.reserve(sum(aligned(size) for size in sizes), 0)
        slots, at = [], 0
        for size in sizes:
            slots.append(Reservation(whole.offset + at, size, whole.view[at : at + size]))
            at += aligned(size)
        return slots

    def _upper_to_disk(self) -> None:
        """On a persisting shutdown: write every accelerator block down to the backing tier."""
        assert self._upper is not None and self.disk is not None
        for key in self._upper.listing():
            if (copy := self._upper_copy(key)) is not None:
                self.disk.append([copy])

    def _upper_copy(self, key: BlockKey) -> tuple[BlockKey, BlockMeta, memoryview] | None:
        """A copy of an accelerator block in fresh memory, or None if it is not there."""
        assert self._upper is not None
        meta = self._upper.meta(key)
        if meta is None:
            return None
        buffer = memoryview(bytearray(meta.size))
        if not self._upper.read_batch([key], [buffer], hit=False):
            return None
        return key, meta, buffer

    def _aborter(self, slot: Reservation) -> Callable[[], None]:
        return lambda: self.host.abort(slot)

    def _from_below(self, keys: Sequence[BlockKey]) -> Found:
        """The run of blocks leading `keys` in the fastest backing tier holding it, read up
        in one batch on a promotion thread; [] if none is held, there is no room, or the
        read outlasts the wait (its blocks are then released when it ends)."""
        for tier in self._below:
            if metas := self._run(tier, keys):
                break
        else:
            return []
        # Wait for room only while dirty blocks are written down: what else holds it may
        # be this very batch's pins.
        room_wait = self.reserve_timeout if self.host.dirty_bytes else 0
        sizes = [meta.size for meta in metas]
        read = self._promoter.submit(self._read_up, tier, keys[: len(metas)], sizes, room_wait)
        try:
            return read.result(timeout=room_wait + READ_TIMEOUT)
        except TimeoutError:
            read.add_done_callback(_release_all)
            return []

    def _run(self, tier: BackingTier, keys: Sequence[BlockKey]) -> list[BlockMeta]:
        """Metadata of the blocks leading `keys` held in `tier` and in no faster tier, up to a
        quarter of DRAM (a transfer must not need all of it)."""
        faster = self.tiers[: self.tiers.index(tier)]
        room = self.host.capacity // 4
        metas: list[BlockMeta] = []
        for key in keys[: max(1, tier.present_prefix(keys))]:
            if metas and any(t.contains(key) for t in faster):
                break
            meta = tier.meta(key)  # None for an absent first key: this tier's miss
            if meta is None or (metas and meta.size > room):
                break
            metas.append(meta)
            room -= meta.size
        return metas

    def _read_up(
        self, tier: BackingTier, keys: Sequence[BlockKey], sizes: list[int], room_wait: float
    ) -> Found:
        """Read a run of `tier`'s blocks into host slots and pin them there: committed
        (promoted), or with `promote` off, private slots freed on release."""
        slots = self._room(sizes, room_wait)
        metas = tier.read_into(keys[: len(slots)], [slot.view for slot in slots])
        for slot in slots[len(metas) :]:
            self.host.abort(slot)
        read = list(zip(keys, metas, slots, strict=False))
        if not self.promote:
            return [
                (PinnedBlock(key, meta, slot.view[: meta.size], slot.offset), self._aborter(slot))
                for key, meta, slot in read
            ]
        self.host.commit_many([(key, meta, slot, True) for key, meta, slot in read])
        with self._counts_lock:
            self._promoted[tier] += len(read)
        # a racing put may have won: pin whichever copy is there
        return [(b, self._unpinner(b)) for b in self.host.pin_prefix(keys[: len(read)])]

    def _room(self, sizes: list[int], timeout: float) -> list[Reservation]:
        """Host slots for as many leading `sizes` as find room, halving the run on refusal."""
        while sizes:
            try:
                return self.host.reserve_many(sizes, timeout)
            except ResourceExhausted:
                sizes, timeout = sizes[: len(sizes) // 2], 0
        return []

    def _unpinner(self, block: PinnedBlock) -> Callable[[], None]:
        return lambda: self.host.unpin(block)

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n


def _release_all(read: Future[Found]) -> None:
    """Release what a read that its get stopped waiting for pinned."""
    if read.exception() is None:
        for _, release in read.result():
            release()


def _roles(
    tiers: tuple[Tier, ...],
) -> tuple[MemoryTier, AcceleratorTier | None, tuple[BackingTier, ...]]:
    """The host tier, the accelerator tier above it (or None) and the backing tiers below
    it. ValueError unless `tiers` lists them in that order."""
    hosts = [(i, tier) for i, tier in enumerate(tiers) if isinstance(tier, MemoryTier)]
    if len(hosts) != 1:
        raise ValueError(f"tiers: expected one host tier, got {len(hosts)}")
    [(at, host)] = hosts
    above = [tier for tier in tiers[:at] if isinstance(tier, AcceleratorTier)]
    below = tuple(tier for tier in tiers[at + 1 :] if isinstance(tier, BackingTier))
    if len(above) != at or at > 1 or len(below) != len(tiers) - at - 1:
        raise ValueError(
            "tiers: expected, fastest first, at most one accelerator tier, the host tier, "
            "then backing tiers"
        )
    if below and not host.write_back:
        raise ValueError("a host tier above a backing tier must write back")
    return host, (above[0] if above else None), below
