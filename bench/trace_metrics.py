"""How a replay spread its prefill work, and how its hit ratio moved over time.

A request's *prefill work* is its blocks minus its hits: the blocks its node computes.
Load spread is the busiest node's work over the mean over nodes, for the whole run
and for sliding windows of consecutive requests in trace order. One request is never
split, so a window holding a request whose work alone exceeds the window's mean per
node cannot be balanced by any router: `attainable` measures against that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 100  # requests: the window
WINDOW_LENGTHS = (100, 200, 500, 1000, 2000)


def node_work(node_of: Sequence[int], work: Sequence[int], nodes: int) -> list[int]:
    out = [0] * nodes
    for n, w in zip(node_of, work, strict=True):
        out[n] += w
    return out


def spread(node_of: Sequence[int], work: Sequence[int], nodes: int) -> float:
    """Busiest node's prefill work / the mean over nodes, over the whole run (1 if none)."""
    per = node_work(node_of, work, nodes)
    mean = sum(per) / nodes
    return max(per) / mean if mean else 1.0


def windows(
    node_of: Sequence[int], work: Sequence[int], nodes: int, size: int = WINDOW
) -> dict[str, float]:
    """Over every window of `size` consecutive requests: worst, p99 and median of busiest
    / mean (`max`, `p99`, `p50`), and the same measured against what the requests'
    sizes allow, busiest / max(mean, largest single request) (`attainable_max`,
    `attainable_p99`); `infeasible`: the share of windows where 1.1 cannot be met."""
    if not work:
        return {}
    size = min(size, len(work))
    w = np.asarray(work, dtype=np.float64)
    per = np.zeros((len(w) + 1, nodes))
    np.add.at(per[1:], (np.arange(len(w)), np.asarray(node_of)), w)
    cumulative = np.cumsum(per, axis=0)
    held = cumulative[size:] - cumulative[:-size]  # windows x nodes
    mean = held.sum(axis=1) / nodes
    busiest = held.max(axis=1)
    largest = sliding_window_view(w, size).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mean > 0, busiest / mean, 1.0)
        attainable = np.where(mean > 0, busiest / np.maximum(mean, largest), 1.0)
        bound = np.where(mean > 0, largest / mean, 0.0)
    return {
        "size": size,
        "max": float(ratio.max()),
        "p99": float(np.percentile(ratio, 99)),
        "p50": float(np.median(ratio)),
        "attainable_max": float(attainable.max()),
        "attainable_p99": float(np.percentile(attainable, 99)),
        "infeasible": float((bound > 1.1).mean()),
    }


def shortest_balanced_window(
    node_of: Sequence[int], work: Sequence[int], nodes: int, limit: float = 1.1
) -> int | None:
    """The shortest of `WINDOW_LENGTHS` whose worst window is within `limit` (None: none)."""
    for size in WINDOW_LENGTHS:
        if size <= len(work) and windows(node_of, work, nodes, size)["max"] <= limit:
            return size
    return None


def hit_ratio_over_time(blocks: Sequence[int], hits: Sequence[int], size: int = 200) -> list[float]:
    """Hit ratio of each run of `size` consecutive requests (the last may be shorter)."""
    out = []
    for start in range(0, len(blocks), size):
        b = sum(blocks[start : start + size])
        out.append(sum(hits[start : start + size]) / b if b else 0.0)
    return out


def sliding_hit_ratio(blocks: Sequence[int], hits: Sequence[int], size: int = 200) -> np.ndarray:
    """Hit ratio of the window of `size` requests ending at each request (from size - 1)."""
    b = np.concatenate([[0], np.cumsum(blocks)])
    h = np.concatenate([[0], np.cumsum(hits)])
    total = b[size:] - b[:-size]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, (h[size:] - h[:-size]) / total, 0.0)
