"""What is known of each kind of tier beyond the node that runs it: one line per kind.

`name` appears in lookups, stats and KV events, and `code` in the cluster index's words in
Redis (two bits: four kinds at most); neither may change once released. Fastest first, in
the order of their codes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TierInfo:
    name: str
    code: int  # in the cluster index (kvstore/cluster/layout.py)
    medium: str  # in KV events: vLLM's MEDIUM_GPU, MEDIUM_CPU and MEDIUM_STORAGE
    weight: float  # a router's default: what a block held here saves, a device block being 1
    hit_source: str  # vLLM's CacheHitSource value for a load served from it


TIER_REGISTRY: tuple[TierInfo, ...] = (
    TierInfo("device", 0, "GPU", 1.0, "device"),
    TierInfo("host", 1, "CPU", 0.8, "host"),
    TierInfo("disk", 2, "STORAGE", 0.5, "disk"),
)
