"""The cluster replayed offline: N LRU nodes, an exact index, the product's routing choice.

What a live replay would give if the index never lagged and the daemons' host tiers
were exact LRU caches: the routing formula of `kvstore.cluster.scoring.choose` on its
own, in seconds, for capacities and node counts that a live sweep takes minutes for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
        node = self.nodes[i]
        for block in list(node.data):
            node.on_evict(block)
        node.data.clear()
        node.capacity = 0

    def anywhere(self, ids: Sequence[int]) -> int:
        return leading_run(ids, self.where)


def replay(
    requests: Sequence[Request],
    capacity: int,
    nodes: int,
    policy: str = "cost",
    seed: int = 0,
    fetch_through: bool = False,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    balance: float = BALANCE,
    kill_at: int | None = None,
    kill_node: int | None = None,
) -> SimRun:
    """Each request goes where `choose` puts it, hits on that node (or, `fetch_through`,
    the leading run held anywhere), then its blocks are touched there, tail first.
    `kill_at`: the node request kill_at goes to (or node `kill_node`) dies first, its
    blocks gone and no more requests for it, and the request goes elsewhere, as the live
    replay's failover does."""
    cluster = SimCluster(capacity, nodes)
    sent, rng = SentWork(), random.Random(seed + 1)  # as Router(seed=seed) draws its ties
    run = SimRun([], [], [])
    names = [f"n{i}" for i in range(nodes)]
    dead: set[int] = set()
    for t, r in enumerate(requests):
        ids, blocks = r.hash_ids, len(r.hash_ids)
        matched = cluster.matched(ids)
        while True:
            candidates = [
                Location(names[i], "", "", m, {"host": m} if m else {}, Load())
                for i, m in enumerate(matched)
                if i not in dead
            ]
            best = choose(candidates, blocks, weights, sent, rng, policy, balance)[0]
            n = names.index(best.node_id)
            if t != kill_at or dead:
                break
            sent.routed(best.node_id, blocks - matched[n])
            victim = n if kill_node is None else kill_node
            dead.add(victim)
            cluster.kill(victim)
            matched = cluster.matched(ids)
        hits = cluster.anywhere(ids) if fetch_through else matched[n]
        sent.routed(best.node_id, blocks - hits)
        cluster.nodes[n].touch(ids)
        run.node_of.append(n)
        run.blocks.append(blocks)
        run.hits.append(hits)
    return run
