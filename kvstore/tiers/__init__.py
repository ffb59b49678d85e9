"""Tiers own bytes; the Store owns policy: device (GPU), host (DRAM), disk (NVMe).
What the Store asks of each kind is in kvstore/tiers/base.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta


@dataclass(frozen=True, slots=True)
class Reservation:
    """A private write target: invisible to readers until committed."""

    offset: int
    size: int
    view: memoryview


@dataclass(frozen=True, slots=True)
class PinnedBlock:
    """A block a reader holds: its bytes cannot be evicted or reused until unpinned."""

    key: BlockKey
    meta: BlockMeta
    view: memoryview
    offset: int  # which copy: a key deleted and put again while pinned has two


Listener = Callable[[str, list[BlockKey], list[BlockKey]], None]  # tier, stored, removed


class Changes:
    """Keys a tier stored and dropped, noted under the tier's lock and reported to the
    listener after the tier let go of it (a listener may ask the store anything)."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.listener: Listener | None = None
        self._stored: list[BlockKey] = []
        self._removed: list[BlockKey] = []
        self._lock = threading.Lock()

    def stored(self, key: BlockKey) -> None:
        if self.listener is not None:
            with self._lock:
                self._stored.append(key)

    def removed(self, key: BlockKey) -> None:
        if self.listener is not None:
            with self._lock:
                self._removed.append(key)

    def report(self) -> None:
        """Call with no tier lock held."""
        if self.listener is None:
            return
        with self._lock:
            stored, removed, self._stored, self._removed = self._stored, self._removed, [], []
        if stored or removed:
            self.listener(self.tier, stored, removed)


def present_count(keys: Sequence[BlockKey], index: Container[BlockKey]) -> int:
    """How many of `keys`, from the first, are in `index` (the tier holds its lock)."""
    n = 0
    for key in keys:
        if key not in index:
            break
        n += 1
    return n
