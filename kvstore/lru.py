"""Least-recently-used eviction as a pure policy object: no I/O, no bytes.

Only evictable keys are tracked: a tier removes a key while it is pinned and
puts it back when the last reader lets go, so the coldest key is always a
legal victim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from kvstore.keys import BlockKey


class LRU:
    def __init__(self) -> None:
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def on_put(self, key: BlockKey) -> None:
        """Track `key` as the most recently used."""
        self._order[key] = None
        self._order.move_to_end(key)

    def on_hit(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def victim(self) -> BlockKey | None:
        """The coldest key, or None when nothing is evictable."""
        return next(iter(self._order), None)

    def __iter__(self) -> Iterator[BlockKey]:
        """Keys from the coldest to the warmest."""
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)
