"""What every measurement returns, and the workload it ran."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    """`total` bytes in blocks of `block_size`, `batch` blocks per request; `part`
    (index, count) selects every count-th batch, the share of one of `count` clients."""

    block_size: int
    total: int
    batch: int
    chunk: int = 1 << 20
    part: tuple[int, int] = (0, 1)

    @property
    def blocks(self) -> int:
        return self.total // self.block_size

    def batches(self) -> Iterator[range]:
        index, count = self.part
        for n, start in enumerate(range(0, self.blocks, self.batch)):
            if n % count == index:
                yield range(start, min(start + self.batch, self.blocks))


@dataclass
class Run:
    nbytes: int
    seconds: float
    latencies: list[float]  # one per request (batch), seconds

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else 0.0


def timed_batches(work: Workload, request: Callable[[range], object]) -> Run:
    """Run `request` for every batch of `work`; time each and the whole."""
    latencies = []
    start = time.perf_counter()
    for batch in work.batches():
        t = time.perf_counter()
        request(batch)
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - start
    return Run(work.blocks * work.block_size, seconds, latencies)


def source_bytes(total: int, seed: int) -> np.ndarray:
    """Seeded random payload bytes: comparable across runs, incompressible."""
    return np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8)


def median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.gbps if r.nbytes else -r.seconds)[len(runs) // 2]
