"""One live replay: every request routed by the product's Router, its blocks got from the
node it went to and checked byte for byte, the rest put there as a prefill worker would.

A request's hits are the leading run of blocks the node served whose bytes are exactly
the block's: a stale or foreign block (another run's, another id's) fails that check,
counts as corrupt and ends the run, so a hit never counts a block that was not served.
Whatever Locate predicted is only what the router went by.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvstore.bench.procs import Processes, RedisServer
from kvstore.bench.trace_cluster import Node, TraceCluster, put_part
from kvstore.bench.trace_format import Request
from kvstore.errors import KVStoreError, Unavailable
from kvstore.router import Route, Router

log = logging.getLogger("kvstore.bench.trace")


class BlockBytes:
    """Keys and payloads derived from a block's hash id and the run's salt: a block of
    another run or another id differs in its key and in its bytes."""

    def __init__(self, salt: bytes, size: int) -> None:
        self.salt, self.size = salt, size
        seed = int.from_bytes(hashlib.blake2b(salt, digest_size=8).digest(), "little")
        self._pad = np.random.default_rng(seed).integers(0, 256, size, np.uint8)
        self._reps = -(-size // 64)

    def key(self, block: int) -> bytes:
        return hashlib.blake2b(block.to_bytes(8, "little"), key=self.salt, digest_size=16).digest()

    def payload(self, block: int) -> np.ndarray:
        digest = hashlib.blake2b(block.to_bytes(8, "little"), key=self.salt, person=b"payload")
        tiled = np.frombuffer(digest.digest() * self._reps, np.uint8)[: self.size]
        return np.bitwise_xor(tiled, self._pad)

    def holds(self, block: int, received: np.ndarray) -> bool:
        return received.nbytes == self.size and np.array_equal(
            received.view(np.uint8).reshape(-1), self.payload(block)
        )


KILL, REDIS_RESTART, REDIS_STALL = "kill", "redis-restart", "redis-stall"


@dataclass(frozen=True)
class Fault:
    """Before request `at`: SIGKILL the node it is routed to (started again, empty, unless
    `restart` is False), restart Redis empty, or stop Redis for `seconds`."""

    kind: str
    at: int
    seconds: float = 0.0
    restart: bool = True

    def __str__(self) -> str:
        return f"{self.kind}@{self.at}" + (f":{self.seconds:g}" if self.kind == REDIS_STALL else "")


@dataclass
class Outcome:
    """Per request (trace order): node index, blocks, hits served, hits Locate predicted,
    seconds end to end and for routing; then the run's counts."""

    node_of: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    locate_s: list[float] = field(default_factory=list)
    hits_by_tier: Counter = field(default_factory=Counter)
    fetched: int = 0
    verified: int = 0
    corrupt: int = 0
    errors: int = 0
    failovers: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    killed: str = ""  # the first node killed, and its index in the cluster
    killed_index: int | None = None
    kills: dict[int, int] = field(default_factory=dict)  # request -> node index killed
    backs: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    blind: set[int] = field(default_factory=set)  # requests routed while Redis was away
    late: int = 0  # requests that took longer than the deadline

    def work(self) -> list[int]:
        return [b - h for b, h in zip(self.blocks, self.hits, strict=True)]


@dataclass
class Replay:
    cluster: TraceCluster
    router: Router
    data: BlockBytes
    tiers_known: bool = False  # ask each node where the blocks it will serve are (disk tier)
    fetch_through: bool = False  # the node pulls what it lacks from the nodes holding it
    faults: Sequence[Fault] = ()
    procs: Processes | None = None  # where killed nodes start again
    deadline_s: float | None = None  # a request that takes longer is late
    speed: float | None = None  # follow the timestamps this many times faster
    outcome: Outcome = field(default_factory=Outcome)

    def __post_init__(self) -> None:
        self._index = {n.node_id: i for i, n in enumerate(self.cluster.nodes)}
        self._out: np.ndarray | None = None
        self._due = {f.at: f for f in self.faults}
        self._restarts: list[threading.Thread] = []

    def run(self, requests: Sequence[Request], advance: Callable[[int], None]) -> Outcome:
        start = time.perf_counter()
        first = requests[0].timestamp if requests else 0
        for i, r in enumerate(requests):
            if self.speed:
                ahead = (r.timestamp - first) / 1000 / self.speed - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
            self.request(i, r)
            if i % 25 == 24 or i == len(requests) - 1:
                advance(i % 25 + 1)
        self.outcome.seconds = time.perf_counter() - start
        for thread in self._restarts:
            thread.join()
        return self.outcome

    def request(self, i: int, r: Request) -> None:
        out, ids = self.outcome, r.hash_ids
        keys = [self.data.key(b) for b in ids]
        began = time.perf_counter()
        self._back(i)
        fault = self._due.pop(i, None)
        if fault and fault.kind == REDIS_RESTART:
            self._redis().restart_empty()
        elif fault and fault.kind == REDIS_STALL:
            self._redis().stall(fault.seconds)
        exclude: set[str] = set()
        while True:
            t = time.perf_counter()
            try:
                route = self.router.route(keys, exclude=exclude)
            except Unavailable as exc:
                log.error("request %d: no node to route to: %s", i, exc)
                self._record(-1, len(ids), 0, 0, began)
                out.errors += 1
                return
            out.locate_s.append(time.perf_counter() - t)
            if not route.indexed:
                out.blind.add(i)
            if fault and fault.kind == KILL and i not in out.kills:
                self._kill(i, route.node_id, fault.restart)
            node = self.cluster.node(route.node_id)
            try:
                hits = self.serve(node, route, ids, keys)
            except Unavailable as exc:  # the node is gone: the request goes elsewhere
                log.info("request %d: %s failed (%s); retrying elsewhere", i, node.node_id, exc)
                out.failovers += 1
                self.router.failed(node.node_id)
                exclude.add(node.node_id)
                continue
            except KVStoreError as exc:
                log.error("request %d on %s: %s", i, node.node_id, exc)
                out.errors += 1
                hits = 0
            self._record(self._index[node.node_id], len(ids), hits, route.matched, began)
            return

    def serve(self, node: Node, route: Route, ids: Sequence[int], keys: list[bytes]) -> int:
        """Get the request's blocks, count the leading run that is right, put the rest."""
        out, data = self.outcome, self.data
        client = node.connect()
        tiers = client.lookup_tiers(keys) if self.tiers_known else []
        got = client.get(keys, out=self._buffer(len(keys)), fetch=self.fetch_through)
        hits = 0
        for block, received in zip(ids, got, strict=False):
            if not data.holds(block, received):
                out.corrupt += 1
                log.error("%s served a wrong block for id %d", node.node_id, block)
                break
            hits += 1
        out.verified += hits
        if self.tiers_known:  # what the node held itself; the rest it fetched
            for i in range(hits):
                out.hits_by_tier[tiers[i] if i < len(tiers) else "fetched"] += 1
            out.fetched += max(0, hits - len(tiers))
        else:
            out.hits_by_tier["host"] += hits
        self.router.served(route, hits)
        self.put(node, ids, keys, hits)
        out.bytes_moved += len(ids) * data.size
        return hits

    def put(self, node: Node, ids: Sequence[int], keys: list[bytes], hits: int) -> None:
        """The blocks after the hits, tail first (the first ends most recent), in parts
        that keep the node's host tier exact (`trace_cluster.put_part`)."""
        part = put_part(self.data.size, node.host_blocks)
        order = list(range(len(ids) - 1, hits - 1, -1))
        client = node.connect()
        for start in range(0, len(order), part):
            chosen = order[start : start + part]
            client.put([keys[j] for j in chosen], [self.data.payload(ids[j]) for j in chosen])

    def _kill(self, i: int, node_id: str, restart: bool) -> None:
        out = self.outcome
        self.cluster.kill(node_id)
        out.kills[i] = self._index[node_id]
        if not out.killed:
            out.killed, out.killed_index = node_id, self._index[node_id]
        if restart:
            thread = threading.Thread(target=self._restart, args=(node_id,), daemon=True)
            thread.start()
            self._restarts.append(thread)

    def _restart(self, node_id: str) -> None:
        assert self.procs is not None, "a replay that restarts nodes needs `procs`"
        try:
            self.cluster.restart(self.procs, node_id)
        except RuntimeError as exc:
            log.error("%s did not start again: %s", node_id, exc)

    def _back(self, i: int) -> None:
        """Nodes started again since the last request take requests from this one on."""
        while self.cluster.restarted:
            node, proc, address = self.cluster.restarted.pop(0)
            node.replaced(proc, address)
            self.outcome.backs[i].append(self._index[node.node_id])

    def _redis(self) -> RedisServer:
        if self.cluster.redis is None:
            raise RuntimeError("Redis faults need a Redis the bench started")
        return self.cluster.redis

    def _buffer(self, blocks: int) -> np.ndarray:
        need = blocks * self.data.size
        if self._out is None or len(self._out) < need:
            self._out = np.empty(max(need, 64 * self.data.size), np.uint8)
        return self._out[:need]

    def _record(self, node: int, blocks: int, hits: int, predicted: int, began: float) -> None:
        out = self.outcome
        out.node_of.append(node)
        out.blocks.append(blocks)
        out.hits.append(hits)
        out.predicted.append(predicted)
        out.latency_s.append(time.perf_counter() - began)
        if self.deadline_s is not None and out.latency_s[-1] > self.deadline_s:
            out.late += 1
