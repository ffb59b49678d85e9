"""The engine adapter on a GPU: store and load a long prompt's paged KV through a local
daemon, next to bulk pinned copies of the same bytes measured in the same run.

    python -m kvstore.bench.gpu_adapter [--tokens 16384] [--json FILE]

Shapes default to an 8B Llama-style model (32 layers, 8 KV heads of 128, bf16),
16-token pages scattered across the pool as an engine leaves them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvstore.bench.procs import Processes
from kvstore.client import Client
from kvstore.client.engine import KVAdapter, KVSpec


def timed(fn, repeat: int, setup=lambda: None) -> float:
    """Median seconds of `repeat` runs after one warm-up, the GPU drained each time;
    `setup` runs before each, untimed."""
    setup()
    fn()
    times = []
    for _ in range(repeat):
        setup()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    spec = KVSpec(
        "gpu-bench", args.layers, args.kv_heads, args.head_dim, torch.bfloat16, args.block_size
    )
    blocks = args.tokens // args.block_size
    pool = blocks * 2  # pages of other requests in between
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages = [
        torch.randn(
            pool,
            2,
            args.block_size,
            args.kv_heads,
            args.head_dim,
            device="cuda",
            dtype=torch.bfloat16,
            generator=gen,
        )
        for _ in range(args.layers)
    ]
    table = torch.randperm(pool, generator=torch.Generator().manual_seed(0))[:blocks].tolist()
    tokens = np.arange(blocks * args.block_size)
    nbytes = blocks * int(np.prod(spec.block_shape)) * 2
    device_buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    rows = {
        "bulk_d2h_pinned": timed(lambda: pinned.copy_(device_buf), args.repeat),
        "bulk_h2d_pinned": timed(lambda: device_buf.copy_(pinned), args.repeat),
    }
    with Processes() as procs:
        address = procs.daemon("--host-capacity", str(3 * nbytes), "--data-timeout", "120")
        with Client(address) as client:
            adapter = KVAdapter(client, spec)

            def stage_out() -> None:  # what store_pages does before the put
                adapter.to_host(adapter.gather_pages(pages, table))

            rows["adapter_gather_d2h"] = timed(stage_out, args.repeat)

            def store() -> None:
                client.delete(adapter.keys(tokens))
                adapter.store_pages(tokens, pages, table)

            rows["adapter_store_pages"] = timed(store, args.repeat)
            fresh = [torch.zeros_like(p) for p in pages]
            rows["adapter_load_pages"] = timed(
                lambda: adapter.load_pages(tokens, fresh, table), args.repeat
            )
            assert all(torch.equal(a[table], b[table]) for a, b in zip(fresh, pages, strict=True))
            transfers = client.stats().transfers
    result = {
        "tokens": blocks * args.block_size,
        "bytes": nbytes,
        "device": torch.cuda.get_device_name(),
        "transfers": transfers,
        "gbps": {k: round(nbytes / v / 1e9, 2) for k, v in rows.items()},
    }
    g = result["gbps"]
    result["ratios"] = {
        "gather_d2h/bulk_d2h": round(g["adapter_gather_d2h"] / g["bulk_d2h_pinned"], 3),
        "store/bulk_d2h": round(g["adapter_store_pages"] / g["bulk_d2h_pinned"], 3),
        "load/bulk_h2d": round(g["adapter_load_pages"] / g["bulk_h2d_pinned"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
