"""kvstore-bench ops: single operations, one block per call, on every path, with p50 and
p99 per call, next to Redis (SET, GET, MGET) and a bare gRPC unary call in the same run.

Gets go into a reused buffer (`out=`), as an engine's staging memory; `get-fresh` rows
allocate the result each time, as a simple client does. `mget` rows get 16 blocks of
4 MiB per call into fresh memory, against Redis MGET of the same bytes. In these rows
`ratios.redis` is Redis's p50 over kvstore's (above 1: kvstore is faster).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from kvstore.bench import ceilings
from kvstore.bench.measure import Run
from kvstore.bench.procs import Processes
from kvstore.bench.report import Row
from kvstore.client import Client
from kvstore.keys import block_keys

HELP = "single-block put, get, lookup latency against Redis and a bare gRPC call"
SIZES = (4 << 10, 64 << 10, 1 << 20)
MGET = (16, 4 << 20)  # blocks per call, block size


def timed(calls: int, call: Callable[[int], object], nbytes: int) -> Run:
    """`calls` calls after a tenth as many untimed; latency of each."""
    for i in range(max(calls // 10, 5)):
        call(calls + i)
    latencies = []
    start = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - t)
    return Run(nbytes * calls, time.perf_counter() - start, latencies)


def kvstore_rows(address: str, path: str, calls: int, seed: int) -> list[Row]:
    rows = []
    with Client(address, transport=path) as client:
        for size in SIZES:
            rows += _kvstore_size(client, path, size, calls if size < 1 << 20 else calls // 4, seed)
        count, size = MGET
        keys = block_keys(np.arange(count), 1, f"ops/{path}/mget/{seed}".encode())
        client.put(keys, _payloads(seed, size, count))
        run = timed(max(calls // 40, 10), lambda i: client.get(keys), size * count)
        rows.append(Row.of("mget", path, size, run, batch=count))
        client.delete(keys)
    return rows


def _kvstore_size(client: Client, path: str, size: int, n: int, seed: int) -> list[Row]:
    keys = block_keys(np.arange(2 * n), 1, f"ops/{path}/{size}/{seed}".encode())
    payloads = _payloads(seed, size, 4)
    out = np.empty(size, np.uint8)
    runs = {
        "put": timed(n, lambda i: client.put([keys[i]], [payloads[i % 4]]), size),
        "get": timed(n, lambda i: client.get([keys[i]], out=out), size),
        "get-fresh": timed(n, lambda i: client.get([keys[i]]), size),
        "lookup": timed(n, lambda i: client.lookup([keys[i]]), 0),
    }
    client.delete(keys)
    return [Row.of(op, path, size, run) for op, run in runs.items()]


def redis_rows(url: str, calls: int, seed: int) -> list[Row]:
    import redis

    rows = []
    with redis.Redis.from_url(url) as r:
        for size in SIZES:
            rows += _redis_size(r, size, calls if size < 1 << 20 else calls // 4, seed)
        count, size = MGET
        keys = [f"ops/mget/{i}".encode() for i in range(count)]
        r.mset({k: p.tobytes() for k, p in zip(keys, _payloads(seed, size, count), strict=True)})
        run = timed(max(calls // 40, 10), lambda i: r.mget(keys), size * count)
        rows.append(Row.of("mget", "redis", size, run, batch=count))
        r.delete(*keys)
    return rows


def _redis_size(r: Any, size: int, n: int, seed: int) -> list[Row]:
    payloads = [p.tobytes() for p in _payloads(seed, size, 4)]
    keys = [f"ops/{size}/{i}".encode() for i in range(2 * n)]
    runs = {
        "put": timed(n, lambda i: r.set(keys[i], payloads[i % 4]), size),
        "get": timed(n, lambda i: r.get(keys[i]), size),
        "get-fresh": timed(n, lambda i: r.get(keys[i]), size),
        "lookup": timed(n, lambda i: r.exists(keys[i]), 0),
    }
    r.delete(*keys)
    return [Row.of(op, "redis", size, run) for op, run in runs.items()]


def _payloads(seed: int, size: int, count: int) -> list[np.ndarray]:
    return [np.random.default_rng(seed + i).integers(0, 256, size, np.uint8) for i in range(count)]


def grpc_unary_row(port: int, calls: int) -> Row:
    """A bare Python gRPC unary call to an empty handler: what any gRPC round trip costs."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ping = channel.unary_unary("/bare/Ping")
        return Row.of("lookup", "grpc_unary", 0, timed(calls, lambda i: ping(b""), 0))


def add_latency_ratios(rows: list[Row]) -> None:
    """Each kvstore row: Redis's p50 over its own, for the same operation and size."""
    redis = {(r.scenario, r.block_size): r for r in rows if r.path == "redis"}
    bare = next((r for r in rows if r.path == "grpc_unary"), None)
    for row in rows:
        if row.path in ("redis", "grpc_unary"):
            continue
        peer = redis.get((row.scenario, row.block_size))
        if peer and row.p50_ms:
            row.ratios["redis"] = round(peer.p50_ms / row.p50_ms, 3)
        if bare and row.p50_ms:
            row.ratios["grpc_unary"] = round(bare.p50_ms / row.p50_ms, 3)


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument(
        "--paths", type=choices(("shm", "tcp", "grpc")), default=["shm", "tcp", "grpc"]
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per operation and size")
    parser.add_argument("--redis-url", help="a running Redis (default: start one)")


def check(args: argparse.Namespace) -> str:
    return "--calls must be at least 40" if args.calls < 40 else ""


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    progress.update(task, total=len(args.paths) + 2)
    rows = []
    for path in args.paths:
        rows += kvstore_rows(address, path, args.calls, args.seed)
        progress.update(task, advance=1, description=f"ops over {path}")
    redis_url = args.redis_url or procs.redis()
    if redis_url:
        rows += redis_rows(redis_url, args.calls, args.seed)
    progress.update(task, advance=1, description="redis")
    port = ceilings.start_server(procs, "grpc")
    rows.append(grpc_unary_row(port, args.calls))
    progress.update(task, advance=1, description="bare grpc")
    add_latency_ratios(rows)
    return rows
