"""A router's view of the cluster: which nodes hold most of a prompt, read from Redis directly.

Routers rank nodes without asking one: `Router(url).locate_tokens(prompt)`
hashes the prompt into block keys and answers, best first, from the cluster
location index that the nodes publish (`kvstore.cluster.ClusterIndex`).
`Router(url).route(keys)` picks the node for a request: where it costs least,
its missing blocks weighed against the prefill work this router already sent
there (`kvstore.cluster.scoring`), so that N nodes hit like one cache of their
total size and a prefix every request shares does not pull them all onto one.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstore.cluster.connection import REDIS_ERRORS, LazyClient, parse_redis_url
from kvstore.cluster.layout import layout_for
from kvstore.cluster.locate import Locator
from kvstore.cluster.registry import Load, NodeRecord, Registry
from kvstore.cluster.scoring import (
    BALANCE,
    HALF_LIFE,
    POLICIES,
    Location,
    Scorer,
    SentWork,
    check_weights,
    choose,
    score,
)
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.keys import BlockKey, block_keys
from kvstore.trust import ClusterSecret

KEEP_NODES_S = 30.0  # routing goes on by the last node list read this long while Redis is away
RETRY_REDIS_S = 1.0  # after Redis failed a call, routes do not wait on it again for this long


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: `location`, the chosen node's holdings (`score` = -cost);
    `ranked`, every node considered, best first; `blocks`, the request's blocks;
    `indexed`, False when Redis was away and the node was chosen by load alone."""

    location: Location
    ranked: tuple[Location, ...]
    blocks: int
    indexed: bool = True

    @property
    def node_id(self) -> str:
        return self.location.node_id

    @property
    def address(self) -> str:
        return self.location.address

    @property
    def matched(self) -> int:
        return self.location.matched


class Router:
    """Thread-safe. Redis is reached on first use; while it is down, calls raise Unavailable.

    A router reads Redis directly, so it is a trusted part of the cluster: `secret` is the
    cluster's secret (a `ClusterSecret`, or the path of the file every node is given with
    `--cluster-secret`), with which it believes only the node records the nodes signed.
    Tenants who route for themselves ask a node's `Locate` instead.

    While Redis is away (down, stalled, or restarted empty until the nodes register
    again), `route` still answers for `KEEP_NODES_S`: from the last node list it read,
    by load alone (`Route.indexed` is False), asking Redis again once a second.

    `policy` (for `route`): "cost" (the default, see `kvstore.cluster.scoring`),
    "prefix" (the longest held prefix) or "random"; `seed` makes its ties, and
    `locate`'s, reproducible. `nodes_ttl_s`: how long `route` reuses the list of live
    nodes (nodes that hold none of a prompt are candidates too).
    """

    def __init__(
        self,
        redis_url: str,
        weights: Mapping[str, float] | None = None,
        *,
        secret: ClusterSecret | str | Path,
        prefix: str = "kv:",
        scorer: Scorer = score,
        seed: int | None = None,
        timeout_s: float = 1.0,
        policy: str = "cost",
        balance: float = BALANCE,
        half_life: float = HALF_LIFE,
        nodes_ttl_s: float = 1.0,
    ) -> None:
        if policy not in POLICIES:
            raise InvalidArgument("policy", f"expected one of {', '.join(POLICIES)}: {policy!r}")
        if not (isinstance(balance, (int, float)) and math.isfinite(balance) and balance >= 0):
            raise InvalidArgument("balance", f"must be a number >= 0, got {balance!r}")
        self._client = LazyClient(parse_redis_url(redis_url), timeout_s)
        self._layout = layout_for(prefix)
        self._secret = secret if isinstance(secret, ClusterSecret) else ClusterSecret.read(secret)
        self._locator = Locator(self._client, self._layout, weights, scorer, seed, self._secret)
        self._weights = check_weights(weights)
        self._policy, self._balance = policy, float(balance)
        self._sent = SentWork(half_life)
        self._rng = random.Random(None if seed is None else seed + 1)
        self._lock = threading.Lock()  # guards the sent work, the rng and the node cache
        self._nodes_ttl_s = nodes_ttl_s
        self._live: tuple[float, dict[str, NodeRecord]] = (-math.inf, {})  # when read, what
        self._down: dict[str, int | None] = {}  # node id -> the incarnation that failed
        self._retry_at, self._away = 0.0, ""  # Redis failed: not asked again before then, why

    def locate(self, keys: Sequence[BlockKey]) -> list[Location]:
        """Per node holding keys[0]: how many leading keys it holds, by tier, scored; best first.

        Equal scores come in a random order (seeded by `seed`), so that requests
        sharing a prefix spread over the nodes holding it.
        """
        return self._locator.locate(keys)

    def locate_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int = 256, salt: bytes = b""
    ) -> list[Location]:
        """`locate` of the prompt's full blocks (`kvstore.keys.block_keys`)."""
        return self.locate(block_keys(token_ids, block_size, salt))

    def route(
        self,
        keys: Sequence[BlockKey],
        *,
        blocks: int | None = None,
        exclude: Collection[str] = (),
    ) -> Route:
        """The node for a request of `keys` (`blocks`: its blocks to prefill if more, such
        as a partial last block that has no key), charged to it as blocks - matched.

        Live nodes that hold nothing of it are candidates too; nodes in `exclude` and
        nodes `failed` since their registration are not. Raises Unavailable when no node
        is left, or when Redis is away and no node list was read in the last
        `KEEP_NODES_S`.
        """
        blocks = len(keys) if blocks is None else blocks
        if blocks < len(keys):
            raise InvalidArgument("blocks", f"{blocks} is fewer than the {len(keys)} keys")
        held = self._held(keys)
        live = self._live_nodes()
        with self._lock:
            candidates = self._candidates(held, live, set(exclude))
            if not candidates:
                raise Unavailable("no live node to route to")
            ranked = choose(
                candidates,
                blocks,
                self._weights,
                self._sent,
                self._rng,
                self._policy,
                self._balance,
            )
            best = ranked[0]
            self._sent.routed(best.node_id, blocks - best.matched)
        return Route(best, tuple(ranked), blocks, held is not None)

    def route_tokens(
        self,
        token_ids: Sequence[int] | np.ndarray,
        block_size: int = 256,
        salt: bytes = b"",
        *,
        exclude: Collection[str] = (),
    ) -> Route:
        """`route` of a prompt: its full blocks' keys, and every block, partial or not."""
        keys = block_keys(token_ids, block_size, salt)
        return self.route(keys, blocks=-(-len(token_ids) // block_size), exclude=exclude)

    def served(self, route: Route, hits: int) -> None:
        """The request hit `hits` leading blocks where it went (the index said
        `route.matched`: it may lag, and fetched blocks count as hits): correct the work."""
        with self._lock:
            self._sent.correct(route.node_id, route.matched - hits)

    def failed(self, node_id: str) -> None:
        """Requests to `node_id` fail: route none there until it registers again."""
        with self._lock:
            record = self._live[1].get(node_id)
            self._down[node_id] = record.incarnation if record else None

    def sent_work(self) -> dict[str, float]:
        """The decayed prefill work this router sent to each node, by node id."""
        with self._lock:
            return self._sent.snapshot()

    def nodes(self) -> list[NodeRecord]:
        """Every live node's registration: addresses, tiers, load."""
        try:
            return Registry(self._client.get(), self._layout, self._secret).live_nodes()
        except REDIS_ERRORS as exc:
            raise Unavailable(f"cluster index at {self._client.target.shown}: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _candidates(
        self, held: list[Location] | None, live: dict[str, NodeRecord], exclude: set[str]
    ) -> list[Location]:
        """Holders as located, then every other live node with nothing matched (lock held)."""
        found = {loc.node_id: loc for loc in held or ()}
        for record in live.values():
            if record.node_id not in found:
                found[record.node_id] = Location(
                    record.node_id, record.address, record.data_address, 0, {}, _load(record)
                )
        for node_id, incarnation in list(self._down.items()):
            current = live.get(node_id)
            if current is None:
                continue
            if incarnation is None:  # failed before this router had seen its record
                self._down[node_id] = current.incarnation
            elif current.incarnation != incarnation:
                del self._down[node_id]  # registered again: it came back
        return [loc for n, loc in found.items() if n not in exclude and n not in self._down]

    def _registry(self) -> dict[str, NodeRecord] | None:
        """The live nodes by id, or None if Redis failed (then not asked for a second)."""
        try:
            return {record.node_id: record for record in self.nodes()}
        except Unavailable as exc:
            self._gone(exc)
            return None

    def _held(self, keys: Sequence[BlockKey]) -> list[Location] | None:
        """`locate(keys)`, or None while Redis is away."""
        if time.monotonic() < self._retry_at:
            return None
        try:
            return self.locate(keys)
        except Unavailable as exc:
            self._gone(exc)
            return None

    def _gone(self, exc: Unavailable) -> None:
        """Redis failed a call: none waits on it for `RETRY_REDIS_S`; `exc` says why."""
        self._retry_at, self._away = time.monotonic() + RETRY_REDIS_S, str(exc)

    def _live_nodes(self) -> dict[str, NodeRecord]:
        """The registry, read again once `nodes_ttl_s` old (outside the lock: it is I/O).
        While Redis is away or lists no node, the last list read in `KEEP_NODES_S`."""
        read_at, live = self._live
        now = time.monotonic()
        if now - read_at < self._nodes_ttl_s:
            return live
        fresh = self._registry() if now >= self._retry_at else None
        if fresh is None:
            if live and now - read_at < KEEP_NODES_S:
                return live
            raise Unavailable(self._away)
        if fresh or not live or now - read_at >= KEEP_NODES_S:
            self._live = (now, fresh)  # one assignment: readers see the old or the new
            return fresh
        return live  # Redis restarted empty: the nodes register again within a heartbeat


def _load(record: NodeRecord) -> Load:
    return record.usage.load
