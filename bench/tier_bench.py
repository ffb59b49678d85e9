"""Tier figures, each beside its ceiling measured in the same run and directory:
- the disk tier's writes (fsync per batch) and cold reads vs. plain sequential
  file I/O of the same bytes (`file_io`);
- puts through a daemon whose host tier is full, so every put waits for blocks
  to be demoted to disk, vs. puts into the same host tier while it is empty.
"""

from __future__ import annotations

import os
import tempfile
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
    """Disk tier put and cold get vs. the file_io ceiling, same bytes, same directory,
    `repeat` times in alternating order (the disk is noisy); medians reported."""
    source = source_bytes(work.total, seed)
    size = work.block_size
    views = [memoryview(source[i * size : (i + 1) * size]) for i in range(work.blocks)]
    keys = block_keys(np.arange(work.blocks), 1, b"disk-bench")
    meta = BlockMeta(size, "uint8", (size,))
    dest = memoryview(bytearray(size))
    runs: dict[tuple[str, str], list[Run]] = {}

    def tier_run(tier_dir: str) -> None:
        tier = DiskTier(tier_dir, 2 * work.total + (1 << 30), fsync="batch")
        try:
            add = lambda batch: tier.append([(keys[i], meta, views[i]) for i in batch])  # noqa: E731
            runs.setdefault(("put", "disk_tier"), []).append(timed_batches(work, add))
            for segment in Path(tier_dir).glob("seg-*.kvs"):  # read from disk, not cache
                with open(segment, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            read = lambda batch: [tier.read_into(keys[i], dest) for i in batch]  # noqa: E731
            runs.setdefault(("get", "disk_tier"), []).append(timed_batches(work, read))
            assert bytes(dest) == bytes(views[-1]), "the disk tier read back other bytes"
        finally:
            tier.close()

    def ceiling_run() -> None:
        for direction in ("put", "get"):
            run = file_io(directory, work, source, direction)
            runs.setdefault((direction, "file_io"), []).append(run)
            os.unlink(directory / "ceiling.bin")

    def kvstore_run() -> None:
        with tempfile.TemporaryDirectory(dir=directory) as tier_dir:
            tier_run(tier_dir)

    for n in range(repeat):  # who goes first alternates: the disk favours one order
        for step in (ceiling_run, kvstore_run) if n % 2 == 0 else (kvstore_run, ceiling_run):
            step()
    return [Row.of(scenario, path, size, median(r)) for (scenario, path), r in runs.items()]


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
