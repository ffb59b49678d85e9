"""`kvstore-bench lmcache`: LMCache's own L2 adapter benchmark (`lmcache bench l2`, LMCache 0.5.6
in .venv-lmcache, made by tests/setup_lmcache.sh) with kvstore's adapter
(`kvstore.integrations.lmcache`, over shared memory and over TCP) beside the built-in adapters
that run here: `mock` (objects cloned in the benchmark's own memory, no IPC) and `resp`
against a redis-server started here. The same sizes in one run, every adapter checked byte for
byte (`--no-skip-verify`). A store, lookup-and-lock or load is one task of `--keys` objects;
each is measured `--repeat` rounds after a warm-up one: GB/s counts the objects that
succeeded, p50/p99 are of the rounds' durations."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from kvstore.bench.report import Row, add_ratios
from kvstore.config import format_size

HELP = "LMCache's L2 adapter benchmark: kvstore beside LMCache's mock and Redis adapters"
ADAPTERS = ("kvstore-shm", "kvstore-tcp", "mock", "redis")
VENV = Path(__file__).resolve().parents[1] / ".venv-lmcache"
ENV_KEYS = {"LMCACHE_TRACK_USAGE": "false", "LMCACHE_DISABLE_BANNER": "1"}
OPERATIONS = ("store", "lookup", "load")  # LMCache's op_0, op_1, op_2
NODE_BYTES = 1 << 30  # the host tier of the node kvstore-bench starts, less its margin


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--adapters", type=choices(ADAPTERS), default=list(ADAPTERS))
    parser.add_argument(
        "--sizes",
        type=sizes,
        default=sizes("256KiB,4MiB"),
        help="bytes per object (one LMCache chunk); whole KiB",
    )
    parser.add_argument("--keys", type=int, default=32, help="objects per task")
    parser.add_argument("--in-flight", type=int, default=1, help="tasks submitted per round")
    parser.add_argument("--venv", type=Path, default=VENV, help="LMCache's environment")


def check(args: argparse.Namespace) -> str:
    if not (args.venv / "bin" / "lmcache").exists():
        return f"no LMCache at {args.venv}: run tests/setup_lmcache.sh"
    if any(size % 1024 for size in args.sizes):
        return "--sizes must be whole KiB (LMCache's --data-size-kb)"
    if min(args.keys, args.in_flight) < 1:
        return "--keys and --in-flight must be at least 1"
    if not args.address and held(args) > NODE_BYTES:
        return (
            "(--repeat + 1) x --in-flight x --keys x the largest size must fit in 1GiB (the "
            "benchmark's node; nothing may be evicted): fewer, or --address of a larger node"
        )
    return ""


def held(args: argparse.Namespace) -> int:
    """The bytes one run stores: every round's objects, the warm-up's too."""
    return (args.repeat + 1) * args.in_flight * args.keys * max(args.sizes)


def run(args: argparse.Namespace, procs: Any, address: str, progress: Any, task: Any) -> list[Row]:
    """One `lmcache bench l2` per adapter and size; each kvstore run keys its objects apart
    (a tenant of its own), so none finds another's blocks stored already."""
    redis = procs.redis_server() if "redis" in args.adapters else None
    if "redis" in args.adapters and redis is None:
        raise SystemExit("the redis adapter needs redis-server on PATH")
    progress.update(task, total=len(args.sizes) * len(args.adapters))
    rows: list[Row] = []
    for size in args.sizes:
        for name in args.adapters:
            if redis is not None:
                _flush(redis.url)
            spec = _spec(name, address, redis, held(args), f"bench-{name}-{size}-{args.seed}")
            rows += _rows(name, size, _bench_l2(procs, args, spec, size))
            what = f"lmcache bench l2: {name}, {format_size(size)}"
            progress.update(task, advance=1, description=what)
    add_ratios(rows)
    for row in rows:
        if not row.path.startswith("kvstore"):
            row.ratios.clear()  # LMCache's own adapters: the figures kvstore's are set against
    return rows


def _spec(name: str, address: str, redis: Any, capacity: int, tenant: str) -> str:
    if name == "mock":
        spec: dict[str, Any] = {"type": "mock", "max_size_gb": capacity / 2**30 + 1}
        spec["mock_bandwidth_gb"] = 1e6  # no simulated limit: the copies' own speed
    elif name == "redis":
        spec = {"type": "resp", "host": "127.0.0.1", "port": redis.port}
    else:
        spec = {"type": "plugin", "module_path": "kvstore.integrations.lmcache"}
        spec["class_name"] = "KVStoreL2Adapter"
        params = {"address": address, "transport": name.removeprefix("kvstore-")}
        spec["adapter_params"] = {**params, "tenant": tenant}
    return json.dumps(spec)


def _bench_l2(procs: Any, args: argparse.Namespace, spec: str, size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-lmcache-") as folder:
        summary = Path(folder) / "summary.json"
        cmd = [
            str(args.venv / "bin" / "lmcache"), "bench", "l2", "--l2-adapter", spec,
            "--num-keys", str(args.keys), "--in-flight", str(args.in_flight),
            "--data-size-kb", str(size // 1024), "--rounds", str(args.repeat),
            "--warmup-rounds", "1", "--lookup-max-hit-rate", "1.0", "--no-skip-verify",
            "--format", "json", "--output", str(summary), "-q",
        ]  # fmt: skip
        proc = procs.spawn(
            cmd, env={**os.environ, **ENV_KEYS}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _, err = proc.communicate()
        if proc.returncode:  # its bytes came back wrong, or it could not run
            raise SystemExit(f"lmcache bench l2 {spec} failed:\n{err.decode()[-3000:]}")
        return json.loads(summary.read_text())["metrics"]


def _rows(name: str, size: int, metrics: dict[str, Any]) -> list[Row]:
    rows = []
    for i, operation in enumerate(OPERATIONS):
        op = metrics[f"op_{i}"]
        seconds = op["duration_avg_ms"] * op["rounds"] / 1e3
        moved = op["total_success"] * size if operation != "lookup" else 0
        extra = {
            "adapter": name,
            "objects": op["total_keys"],
            "succeeded": op["total_success"],
            "ops_per_s": op["total_success"] / seconds if seconds else 0.0,
            "lmcache_throughput_mib_s": op["throughput_avg_mbps"],
        }
        row = Row(
            operation,
            name,
            size,
            moved,
            round(moved / seconds / 1e9, 4) if moved and seconds else None,
            op["duration_p50_ms"],
            op["duration_p99_ms"],
            extra=extra,
        )
        rows.append(row)
    return rows


def _flush(url: str) -> None:
    """Empty the Redis between runs, so each starts as the first did."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()
