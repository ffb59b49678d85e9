"""The Store: what the server calls. It owns policy (placement, reads, lookups);
tiers own bytes. Today one host tier; lower tiers slot in beneath it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.tiers import PinnedBlock, Reservation, Tier, TierStats


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    puts: int
    gets: int
    lookups: int
    uptime_s: float
    transfers: dict[str, int] = field(default_factory=dict)  # by "put/PATH"; filled by the server


class ReadBatch:
    """The present prefix of a Get, pinned until each block is released."""

    def __init__(self, tier: Tier, blocks: list[PinnedBlock]) -> None:
        self._tier = tier
        self.blocks = blocks
        self._held = {id(b): b for b in blocks}

    def release(self, block: PinnedBlock) -> None:
        """Let the tier evict `block` again; safe to call once the bytes are copied out."""
        if self._held.pop(id(block), None) is not None:
            self._tier.unpin(block)

    def close(self) -> None:
        for block in list(self._held.values()):
            self.release(block)


class Store:
    def __init__(self, host: Tier, *, max_block_size: int, reserve_timeout: float) -> None:
        self.host = host
        self.max_block_size = max_block_size
        self.reserve_timeout = reserve_timeout
        self._started = time.monotonic()
        self._counts = {"puts": 0, "gets": 0, "lookups": 0}
        self._counts_lock = threading.Lock()

    def contains(self, key: BlockKey) -> bool:
        return self.host.contains(key)

    def reserve(self, size: int) -> Reservation:
        """A private slot for a block's bytes; waits for space up to `reserve_timeout`."""
        return self.host.reserve(size, self.reserve_timeout)

    def commit(self, key: BlockKey, meta: BlockMeta, reservation: Reservation) -> bool:
        """Make a whole block visible; False if the key was already present."""
        stored = self.host.commit(key, meta, reservation)
        self._count("puts", int(stored))
        return stored

    def abort(self, reservation: Reservation) -> None:
        self.host.abort(reservation)

    def lookup(self, keys: Sequence[BlockKey]) -> list[str]:
        """Tier name of each block of the longest present prefix of `keys`."""
        self._count("lookups", 1)
        return [self.host.name] * self.host.present_prefix(keys)

    def pin(self, keys: Sequence[BlockKey]) -> ReadBatch:
        """Pin the present prefix of `keys`; the caller must close the batch."""
        batch = ReadBatch(self.host, self.host.pin_prefix(keys))
        self._count("gets", len(batch.blocks))
        return batch

    @contextmanager
    def read(self, keys: Sequence[BlockKey]) -> Iterator[ReadBatch]:
        """Pin the present prefix of `keys` for the duration of a transfer."""
        batch = self.pin(keys)
        try:
            yield batch
        finally:
            batch.close()

    def delete(self, keys: Sequence[BlockKey]) -> int:
        return self.host.delete(keys)

    def stats(self) -> StoreStats:
        with self._counts_lock:
            counts = dict(self._counts)
        return StoreStats(
            tiers=(self.host.stats(),), uptime_s=time.monotonic() - self._started, **counts
        )

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n
