"""How a router ranks the nodes holding a prompt's prefix, and picks one node per request.

The ranking of `locate` lives in one pure function, `score`, so that it can be
swapped (`Router(..., scorer=...)`) without touching how holdings are read. The
choice of `Router.route` is `choose`: the node where the request costs least,

    cost_n = (B - sum_t w_t m_n,t) + BALANCE * (L_n - min_j L_j) + LOAD_PENALTY * inflight_n

for a request of B blocks of which node n holds m_n,t leading blocks in tier t
(w: the tier weights), where L_n is the prefill work (blocks - hits) this router
sent to node n, decayed by half every HALF_LIFE routed requests (`SentWork`), and
inflight_n the transfers node n reported at its last heartbeat. Ties go to the
least loaded node, then at random.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from kvstore.cluster.layout import TIERS
from kvstore.errors import InvalidArgument
from kvstore.results import Location
from kvstore.tiers.registry import TIER_REGISTRY

DEFAULT_WEIGHTS: Mapping[str, float] = {tier.name: tier.weight for tier in TIER_REGISTRY}
LOAD_PENALTY = 0.1  # score per transfer in flight: ten of them weigh one device block
# route(): a node is passed over once its recent prefill work exceeds another's by more
# than 10 times the host blocks it would save (0.8 / BALANCE), so a prefix that every
# request shares, a block or two, stops drawing traffic after a fraction of one request.
BALANCE = 0.08
HALF_LIFE = 50.0  # routed requests: the sent work forgets half of itself in this many
POLICIES = ("cost", "prefix", "random")


Scorer = Callable[[Location, Mapping[str, float]], float]


def score(location: Location, weights: Mapping[str, float]) -> float:
    """Sum of tier weights over the matched blocks, minus a small penalty for load."""
    saved = sum(weights[tier] * n for tier, n in location.tiers.items())
    return saved - LOAD_PENALTY * location.load.inflight


def rank(
    found: Iterable[Location], weights: Mapping[str, float], scorer: Scorer, rng: random.Random
) -> list[Location]:
    """Best first. Equal scores come in random order: nodes holding the same prefix
    (a shared system prompt) share its requests instead of one taking them all."""
    scored = [replace(loc, score=scorer(loc, weights)) for loc in found]
    return sorted(scored, key=lambda loc: (-loc.score, rng.random()))


def check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """The default weights, overridden by `weights` (a subset of the tiers)."""
    if weights is not None and not isinstance(weights, Mapping):
        raise InvalidArgument("weights", f"must map tiers to weights, got {type(weights).__name__}")
    merged = dict(DEFAULT_WEIGHTS)
    for tier, weight in (weights or {}).items():
        if tier not in TIERS:
            raise InvalidArgument("weights", f"unknown tier {tier!r} (tiers: {', '.join(TIERS)})")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise InvalidArgument("weights", f"{tier}: must be a number >= 0, got {weight!r}")
        merged[tier] = float(weight)
    return merged


def prefill_cost(location: Location, blocks: int, weights: Mapping[str, float]) -> float:
    """Blocks' worth of prefill a request of `blocks` blocks costs on the node: the
    blocks it lacks, and for those it holds, the share of a block their tier does not save."""
    saved = sum(weights[tier] * n for tier, n in location.tiers.items())
    return blocks - saved


class SentWork:
    """The prefill work a router sent to each node, decayed per routed request.

    Per request, not per second, so that a replay at any speed sees the same load,
    and nothing waits on heartbeats, which in a fast replay are hundreds of requests
    apart and would let every request until the next one herd onto the node that
    looked idle. Not thread-safe: the router holds its lock around it.
    """

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        if not (isinstance(half_life, (int, float)) and half_life > 0):
            raise InvalidArgument("half_life", f"must be a number > 0, got {half_life!r}")
        self._decay = 2.0 ** (-1.0 / half_life)
        self._work: dict[str, float] = {}

    def __getitem__(self, node_id: str) -> float:
        return self._work.get(node_id, 0.0)

    def routed(self, node_id: str, work: float) -> None:
        """One more request routed: everything decays once, then `node_id` gets `work`."""
        decay = self._decay
        for node in self._work:
            self._work[node] *= decay
        self._work[node_id] = self[node_id] + work

    def correct(self, node_id: str, delta: float) -> None:
        """The node did `delta` more work than charged (negative: less)."""
        self._work[node_id] = max(0.0, self[node_id] + delta)

    def snapshot(self) -> dict[str, float]:
        return dict(self._work)


def choose(
    candidates: Sequence[Location],
    blocks: int,
    weights: Mapping[str, float],
    sent: SentWork,
    rng: random.Random,
    policy: str = "cost",
    balance: float = BALANCE,
) -> list[Location]:
    """`candidates` best first for a request of `blocks` blocks, each with `score` = -cost
    (`policy` "cost", see the module), or = matched ("prefix": the longest held prefix)
    or = 0 ("random"); ties at random, for "cost" after the least sent work.
    """
    if policy not in POLICIES:
        raise InvalidArgument("policy", f"expected one of {', '.join(POLICIES)}, got {policy!r}")
    low = min((sent[c.node_id] for c in candidates), default=0.0)

    def merit(c: Location) -> float:
        if policy == "prefix":
            return float(c.matched)
        if policy == "random":
            return 0.0
        load = balance * (sent[c.node_id] - low) + LOAD_PENALTY * c.load.inflight
        return -(prefill_cost(c, blocks, weights) + load)

    def order(c: Location) -> tuple[float, float, float]:
        tie = sent[c.node_id] if policy == "cost" else 0.0
        return (-round(c.score, 9), tie, rng.random())

    # by node id first: the same seed then makes the same choices whatever order came in
    scored = [replace(c, score=merit(c)) for c in sorted(candidates, key=lambda c: c.node_id)]
    return sorted(scored, key=order)
