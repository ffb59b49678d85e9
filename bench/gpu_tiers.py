"""The device tier on a GPU: batched block moves up and down, next to bulk pinned
copies of the same bytes measured in the same run.

    python -m kvstore.bench.gpu_tiers [--total 1GiB] [--block-sizes 256KiB,4MiB] [--json FILE]

Host blocks live in one page-locked buffer, as the daemon's arena does. "contiguous"
batches lie back to back there (blocks put one after another); "scattered" ones
every other block (one host copy per block up; a staging bounce down).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.bench.gpu_adapter import timed
from kvstore.config import format_size, parse_size
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.tiers.device import DeviceTier

BATCH = 64 << 20  # bytes per move, as the Store moves them


def bulk_rates(host: torch.Tensor, repeat: int) -> dict[str, float]:
    """GB/s of one pinned copy of all of `host` to the device and back: the ceiling."""
    device = torch.empty(len(host), dtype=torch.uint8, device="cuda")
    up = timed(lambda: device.copy_(host, non_blocking=True), repeat)
    down = timed(lambda: host.copy_(device, non_blocking=True), repeat)
    return {"up": len(host) / up / 1e9, "down": len(host) / down / 1e9}


def move_rows(
    memory: memoryview, total: int, size: int, bulk: dict[str, float], repeat: int
) -> list[dict]:
    """Blocks of `size` up to the device tier and back down, 64 MiB per batch, from host
    blocks back to back ("contiguous") and every other block ("scattered")."""
    n = total // size
    per_batch = max(1, BATCH // size)
    keys = block_keys(np.arange(n), 1, b"gpu-tiers")
    meta = BlockMeta(size, "uint8", (size,))
    batches = [range(s, min(s + per_batch, n)) for s in range(0, n, per_batch)]
    rows = []
    for layout, stride in (("contiguous", 1), ("scattered", 2)):
        views = [memory[i * stride * size :][:size] for i in range(n)]
        tier = DeviceTier(total + BATCH, "cuda")

        def up(tier: DeviceTier = tier, views: list = views) -> None:
            for batch in batches:
                tier.put_batch([(keys[i], meta, views[i]) for i in batch])

        def down(tier: DeviceTier = tier, views: list = views) -> None:
            for batch in batches:
                tier.read_batch([keys[i] for i in batch], [views[i] for i in batch])

        for direction, fn, setup in (
            ("up", up, lambda tier=tier: tier.delete(keys)),
            ("down", down, lambda: None),
        ):
            gbps = n * size / timed(fn, repeat, setup) / 1e9
            rows.append(
                {
                    "scenario": "device_tier",
                    "direction": direction,
                    "block_size": size,
                    "layout": layout,
                    "gbps": round(gbps, 2),
                    "vs_bulk": round(gbps / bulk[direction], 3),
                }
            )
        check = np.empty(size, np.uint8)
        tier.read_batch(keys[-1:], [check.data])
        assert np.array_equal(check, np.frombuffer(views[-1], np.uint8)), "bytes differ"
        del tier
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--total", type=parse_size, default=1 << 30)
    ap.add_argument("--block-sizes", default="256KiB,4MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    total = args.total
    host = torch.empty(2 * total, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)
    bulk = bulk_rates(host[:total], args.repeat)
    rows: list[dict[str, Any]] = [
        {"scenario": "bulk", "direction": d, "gbps": round(g, 2)} for d, g in bulk.items()
    ]
    memory = host.numpy().data
    for size in (parse_size(s) for s in args.block_sizes.split(",")):
        rows += move_rows(memory, total, size, bulk, args.repeat)
    for row in rows:
        print(
            f"{row['scenario']:12} {row['direction']:5} "
            f"{format_size(row.get('block_size', total)):>7} {row.get('layout', ''):11} "
            f"{row['gbps']:7.2f} GB/s {row.get('vs_bulk', '')}"
        )
    if args.json:
        machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"machine": machine, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
