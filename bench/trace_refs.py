"""Offline references for a trace replay, computed from the trace alone.

Requests run one at a time in trace order. A request's *hits* are its leading-
prefix hits: the longest run hash_ids[0:k] whose every block the cache holds when
the request arrives (a block held after a missing one is useless without the blocks
before it). Then the request *runs*: its blocks are stored before the next request.

- `unbounded`: nothing is ever evicted; block i hits iff it and every block before it
  were stored by an earlier request. The ceiling of any cache.
- `lru`: one LRU cache of `capacity` blocks. After the lookup every block of the
  request is touched (stored if absent, made most recent if present), tail first, so
  its first block ends up most recent; while more than `capacity` blocks are held,
  the least recent goes. A request longer than the cache leaves its first blocks.
- `belady`: Belady's MIN at `capacity` blocks, next use counted per request: every
  block of the request is stored, tail first, with its next use the index of the
  next request containing it (never: infinitely far); while more than `capacity` are
  held, the block of furthest next use goes (possibly one just stored); ties go to
  the block touched longest ago, the deepest of the request. MIN maximises hits
  anywhere in a request, not leading-prefix hits: a reference, not an upper bound.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from kvstore.bench.trace_format import TOKENS_PER_BLOCK, Request

NEVER = 1 << 62  # next use of a block no later request contains


@dataclass(frozen=True)
class Hits:
    """Per-request leading-prefix hits of one replay, with the ratios the bench reports."""

    name: str
    per_request: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.per_request)

    def ratio(self, requests: Sequence[Request]) -> float:
        """Hit blocks / all blocks."""
        blocks = sum(len(r.hash_ids) for r in requests)
        return self.total / blocks if blocks else 0.0

    def token_ratio(
        self, requests: Sequence[Request], tokens_per_block: int = TOKENS_PER_BLOCK
    ) -> float:
        """Prompt tokens in hit blocks / all prompt tokens (a partial last block counts
        what it holds)."""
        return token_ratio(requests, self.per_request, tokens_per_block)


def hit_tokens(
    requests: Sequence[Request], hits: Sequence[int], tokens_per_block: int = TOKENS_PER_BLOCK
) -> int:
    """Prompt tokens in the hit blocks: the prefill a cache saved (a partial last block
    counts what it holds)."""
    return sum(
        min(r.input_length, k * tokens_per_block) for r, k in zip(requests, hits, strict=True)
    )


def token_ratio(
    requests: Sequence[Request], hits: Sequence[int], tokens_per_block: int = TOKENS_PER_BLOCK
) -> float:
    tokens = sum(r.input_length for r in requests)
    return hit_tokens(requests, hits, tokens_per_block) / tokens if tokens else 0.0


def leading_run(ids: Sequence[int], held: Container[int]) -> int:
    k = 0
    for block in ids:
        if block not in held:
            break
        k += 1
    return k


def unbounded(requests: Sequence[Request]) -> Hits:
    seen: set[int] = set()
    hits = []
    for r in requests:
        hits.append(leading_run(r.hash_ids, seen))
        seen.update(r.hash_ids)
    return Hits("unbounded", tuple(hits))


class LRUCache:
    """An LRU cache of block ids, touched as a request touches it (tail first).

    `on_store` / `on_evict` see every block that enters or leaves (an index of the
    cluster model keeps itself exact through them)."""

    __slots__ = ("capacity", "data", "on_evict", "on_store")

    def __init__(
        self,
        capacity: int,
        on_store: Callable[[int], None] | None = None,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.data: OrderedDict[int, None] = OrderedDict()
        self.on_store, self.on_evict = on_store, on_evict

    def __contains__(self, block: object) -> bool:
        return block in self.data

    def __len__(self) -> int:
        return len(self.data)

    def touch(self, ids: Sequence[int]) -> None:
        data = self.data
        for block in reversed(ids):
            if block in data:
                data.move_to_end(block)
                continue
            if self.capacity <= 0:
                continue
            data[block] = None
            if self.on_store:
                self.on_store(block)
            if len(data) > self.capacity:
                old, _ = data.popitem(last=False)
                if self.on_evict:
                    self.on_evict(old)


def lru(requests: Sequence[Request], capacity: int) -> Hits:
    cache = LRUCache(capacity)
    hits = []
    for r in requests:
        hits.append(leading_run(r.hash_ids, cache))
        cache.touch(r.hash_ids)
    return Hits(f"lru({capacity})", tuple(hits))


def next_uses(requests: Sequence[Request]) -> list[list[int]]:
    """For request t and its block at position i: the next request after t containing it."""
    out: list[list[int]] = [[] for _ in requests]
    last: dict[int, int] = {}
    for t in range(len(requests) - 1, -1, -1):
        ids = requests[t].hash_ids
        out[t] = [last.get(b, NEVER) for b in ids]
        for b in ids:
            last[b] = t
    return out


def belady(requests: Sequence[Request], capacity: int) -> Hits:
    uses = next_uses(requests)
    held: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, touch clock, block); stale ones skipped
    hits = []
    clock = 0
    for t, r in enumerate(requests):
        ids = r.hash_ids
        hits.append(leading_run(ids, held))
        for i in range(len(ids) - 1, -1, -1):
            block, use = ids[i], uses[t][i]
            held[block] = use
            clock += 1
            heapq.heappush(heap, (-use, clock, block))
            while len(held) > capacity:
                neg, _, victim = heapq.heappop(heap)
                if held.get(victim) == -neg:  # else an entry from an earlier touch
                    del held[victim]
    return Hits(f"belady({capacity})", tuple(hits))


def node_capacities(capacity: int, nodes: int) -> list[int]:
    """floor(capacity / nodes) blocks each, the first capacity mod nodes one more."""
    base, extra = divmod(capacity, nodes)
    return [base + (i < extra) for i in range(nodes)]


@dataclass(frozen=True)
class References:
    unbounded: Hits
    single_lru: Hits
    belady: Hits

    @classmethod
    def of(cls, requests: Sequence[Request], capacity: int) -> References:
        return cls(unbounded(requests), lru(requests, capacity), belady(requests, capacity))
