"""The cluster location index in Redis: which node holds which block, in which tier.

Nodes publish through `ClusterIndex` (off the request path; a node serves
local-only while Redis is away and re-publishes when it returns); routers read
through `kvstore.router.Router` or a node's `ClusterIndex.locate`. The Redis
data model is in `layout`; the ranking formula is `scoring.score`, and the routing
choice (one node per request) `scoring.choose`.
"""

from kvstore.cluster.index import ClusterIndex, IndexStats
from kvstore.cluster.layout import TIERS
from kvstore.cluster.registry import Load, NodeRecord, NodeUsage, TierUsage
from kvstore.cluster.scoring import (
    BALANCE,
    DEFAULT_WEIGHTS,
    HALF_LIFE,
    POLICIES,
    Location,
    SentWork,
    choose,
    prefill_cost,
    rank,
    score,
)

__all__ = [
    "BALANCE",
    "DEFAULT_WEIGHTS",
    "HALF_LIFE",
    "POLICIES",
    "TIERS",
    "ClusterIndex",
    "IndexStats",
    "Load",
    "Location",
    "NodeRecord",
    "NodeUsage",
    "SentWork",
    "TierUsage",
    "choose",
    "prefill_cost",
    "rank",
    "score",
]
