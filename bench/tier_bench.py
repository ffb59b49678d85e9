"""Tier figures, each beside its ceiling measured in the same run and directory:
- the disk tier's writes (fsync per batch) and cold reads vs. plain sequential
  file I/O of the same bytes (`file_io`);
- puts through a daemon whose host tier is full, so every put waits for blocks
  to be demoted to disk, vs. puts into the same host tier while it is empty.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.bench.ceilings import file_io
from kvstore.bench.measure import Run, Workload, median, source_bytes, timed_batches
from kvstore.bench.procs import Processes
from kvstore.bench.report import Row
from kvstore.client import Client
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.tiers.disk import DiskTier

BATCH_BYTES = 64 << 20


def disk_rows(directory: Path, work: Workload, seed: int, repeat: int) -> list[Row]:
    """Disk tier put and cold get vs. plain sequential file I/O, `repeat` times in
    alternating order (the disk is noisy and favours whoever goes first); medians.

    The put ceiling is `file_io` (writes with an fsync per batch). The get ceiling
    reads the tier's own segment files front to back, just as cold: the same bytes,
    as they lie on disk. (Under a VM, a file written through the page cache can be
    read back from the host's cache, which no guest can drop: a ceiling no cold read
    of other bytes reaches.)"""
    source = source_bytes(work.total, seed)
    size = work.block_size
    views = [source[i * size : (i + 1) * size].data for i in range(work.blocks)]
    keys = block_keys(np.arange(work.blocks), 1, b"disk-bench")
    meta = BlockMeta(size, "uint8", (size,))
    dest = memoryview(bytearray(size))
    runs: dict[tuple[str, str], list[Run]] = {}

    def record(scenario: str, path: str, run: Run) -> None:
        runs.setdefault((scenario, path), []).append(run)

    def file_put() -> None:
        record("put", "file_io", file_io(directory, work, source, "put"))
        os.unlink(directory / "ceiling.bin")

    def tier_put_and_gets(first: int) -> None:
        with tempfile.TemporaryDirectory(dir=directory) as tier_dir:
            tier = DiskTier(tier_dir, 2 * work.total + (1 << 30), fsync="batch")
            try:
                add = lambda batch: tier.append([(keys[i], meta, views[i]) for i in batch])  # noqa: E731
                record("put", "disk_tier", timed_batches(work, add))
                segments = sorted(Path(tier_dir).glob("seg-*.kvs"))

                def tier_get() -> None:
                    read = lambda b: tier.read_into([keys[i] for i in b], [dest] * len(b))  # noqa: E731
                    record("get", "disk_tier", timed_batches(work, read))
                    assert bytes(dest) == bytes(views[-1]), "the disk tier read other bytes"

                gets = [lambda: record("get", "file_io", _read_files(segments, dest)), tier_get]
                for get in gets[first:] + gets[:first]:
                    _drop_cache(segments)
                    get()
            finally:
                tier.close()

    for n in range(repeat):
        if n % 2 == 0:
            file_put()
            tier_put_and_gets(0)
        else:
            tier_put_and_gets(1)
            file_put()
    return [Row.of(scenario, path, size, median(r)) for (scenario, path), r in runs.items()]


def _drop_cache(paths: list[Path]) -> None:
    """Make the next read of `paths` come from the disk, not the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _read_files(paths: list[Path], dest: memoryview) -> Run:
    """Plain sequential reads of whole files into a reused buffer."""
    start, n = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(dest):
                n += got
    seconds = time.perf_counter() - start
    return Run(n, seconds, [seconds])


def demotion_rows(
    procs: Processes, directory: Path, host: int, block_size: int, transport: str, seed: int
) -> list[Row]:
    """Puts into an empty host tier (half of it: below the dirty ratio, nothing demoted),
    then twice its size more: every put now waits for the demoter to make room."""
    address = procs.daemon(
        "--host-capacity", str(host), "--disk-dir", tempfile.mkdtemp(dir=directory)
    )
    empty = Workload(block_size, host // 2, BATCH_BYTES // block_size)
    full = Workload(block_size, 2 * host, BATCH_BYTES // block_size)
    source = source_bytes(full.total, seed)
    views = [source[i * block_size : (i + 1) * block_size] for i in range(full.blocks)]
    keys = iter(block_keys(np.arange(empty.blocks + full.blocks), 1, transport.encode()))
    stored = 0
    with Client(address, transport=transport) as client:

        def put(batch: range) -> None:
            nonlocal stored
            stored += client.put(
                [next(keys) for _ in batch], views[batch.start : batch.stop]
            ).stored

        first = timed_batches(empty, put)
        second = timed_batches(full, put)
        host_stats, disk_stats = client.stats().tiers
    assert stored == empty.blocks + full.blocks, "some puts were not stored"
    rows = [
        Row.of(
            "demotion",
            transport,
            block_size,
            run,
            host_tier=state,
            demotions=host_stats.demotions,
            disk_errors=disk_stats.errors,
        )
        for state, run in (("empty", first), ("full", second))
    ]
    rows[-1].ratios["empty_host"] = round(second.gbps / first.gbps, 3)
    return rows
