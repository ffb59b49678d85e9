"""The cluster replayed offline: N LRU nodes, an exact index, the product's routing choice.

What a live replay would give if the index never lagged and the daemons' host tiers
were exact LRU caches: the routing formula of `kvstore.cluster.scoring.choose` on its
own, in seconds, for capacities and node counts that a live sweep takes minutes for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvstore.bench.trace_format import Request
from kvstore.bench.trace_refs import LRUCache, leading_run, node_capacities
from kvstore.cluster.registry import Load
from kvstore.cluster.scoring import BALANCE, DEFAULT_WEIGHTS, Location, SentWork, choose


@dataclass
class SimRun:
    """Per request: the node it went to, its blocks and the hits it was served."""

    node_of: list[int]
    blocks: list[int]
    hits: list[int]

    @property
    def ratio(self) -> float:
        return sum(self.hits) / sum(self.blocks) if self.blocks else 0.0

    def work(self) -> list[int]:
        return [b - h for b, h in zip(self.blocks, self.hits, strict=True)]


class SimCluster:
    """LRU nodes (`trace_refs.LRUCache`) and block -> bitmask of the nodes holding it."""

    def __init__(self, capacity: int, nodes: int) -> None:
        self.n = nodes
        self.where: dict[int, int] = {}
        self.nodes = [
            LRUCache(c, self._on(i, True), self._on(i, False))
            for i, c in enumerate(node_capacities(capacity, nodes))
        ]

    def _on(self, i: int, stored: bool) -> Callable[[int], None]:
        bit, where = 1 << i, self.where

        def change(block: int) -> None:
            mask = where.get(block, 0)
            mask = mask | bit if stored else mask & ~bit
            if mask:
                where[block] = mask
            else:
                where.pop(block, None)

        return change

    def matched(self, ids: Sequence[int]) -> list[int]:
        """Per node, the leading run of `ids` it holds."""
        out = [0] * self.n
        for j in range(self.n):
            bit = 1 << j
            k = 0
            for block in ids:
                if not self.where.get(block, 0) & bit:
                    break
                k += 1
            out[j] = k
        return out

    def kill(self, i: int) -> None:
        """Node i is gone, and all it held."""
        node, forget = self.nodes[i], self._on(i, stored=False)
        for block in node.data:
            forget(block)
        node.data.clear()
        node.capacity = 0

    def anywhere(self, ids: Sequence[int]) -> int:
        return leading_run(ids, self.where)


@dataclass(frozen=True)
class Faults:
    """What befell a live replay, by request index: nodes killed before it was served
    (the node it was first routed to), nodes back (empty) before it was routed, and the
    requests routed while Redis was away (by load alone)."""

    kills: Mapping[int, int] = field(default_factory=dict)
    backs: Mapping[int, Sequence[int]] = field(default_factory=dict)
    blind: frozenset[int] = frozenset()


def replay(
    requests: Sequence[Request],
    capacity: int,
    nodes: int,
    policy: str = "cost",
    seed: int = 0,
    fetch_through: bool = False,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    balance: float = BALANCE,
    faults: Faults = Faults(),
) -> SimRun:
    """Each request goes where `choose` puts it, hits on that node (or, `fetch_through`,
    the leading run held anywhere), then its blocks are touched there, tail first.
    `faults`: a killed node's blocks are gone and no request goes to it until it is back
    (empty); the request that found it dead was charged to it, as the live router's was,
    and goes elsewhere; a request routed blind sees no holdings, only the load."""
    cluster = SimCluster(capacity, nodes)
    sizes = [node.capacity for node in cluster.nodes]
    sent, rng = SentWork(), random.Random(seed + 1)  # as Router(seed=seed) draws its ties
    run = SimRun([], [], [])
    names = [f"n{i}" for i in range(nodes)]
    dead: set[int] = set()
    for t, r in enumerate(requests):
        ids, blocks = r.hash_ids, len(r.hash_ids)
        for i in faults.backs.get(t, ()):
            dead.discard(i)
            cluster.nodes[i].capacity = sizes[i]
        matched = cluster.matched(ids)
        if t in faults.kills:
            victim = faults.kills[t]
            sent.routed(names[victim], blocks - matched[victim])
            dead.add(victim)
            cluster.kill(victim)
            matched = cluster.matched(ids)
        seen = [0] * nodes if t in faults.blind else matched
        candidates = [
            Location(names[i], "", "", m, {"host": m} if m else {}, Load())
            for i, m in enumerate(seen)
            if i not in dead
        ]
        n = names.index(choose(candidates, blocks, weights, sent, rng, policy, balance)[0].node_id)
        hits = cluster.anywhere(ids) if fetch_through else matched[n]
        sent.routed(names[n], blocks - seen[n])
        sent.correct(names[n], seen[n] - hits)
        cluster.nodes[n].touch(ids)
        run.node_of.append(n)
        run.blocks.append(blocks)
        run.hits.append(hits)
    return run
