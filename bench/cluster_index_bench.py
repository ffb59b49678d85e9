"""Measure the cluster location index against a redis-server of its own.

    python -m kvstore.bench.cluster_index_bench [--json FILE] [--quick]

- locate: Router.locate p50/p99 for prompts of 1k, 32k and 128k tokens (block
  size 256: 4, 128, 512 keys), 16 nodes holding overlapping prefixes, and the
  worst case of all 16 holding all of it; with locate_tokens (hashing too), and
  Redis's own time per call (INFO commandstats); and the overlapping case on a
  3-shard Redis Cluster.
- memory: bytes per indexed (block, node) entry, 100k blocks held by 1, 2, 3
  or 1-3 nodes (INFO memory, after Redis finished rehashing; MEMORY USAGE).
- republish: entries per second one node re-publishes into an empty Redis.
- absence: seconds from a node's SIGKILL to its absence (heartbeat 1 s, TTL 5 s).
- converge: seconds from kill -9 + restart of Redis (empty) until every one of
  16 nodes (10k blocks each) is back in the answers.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import redis

from kvstore.bench.procs import Processes, cluster_secret, free_port
from kvstore.cluster import TIERS, ClusterIndex
from kvstore.keys import block_keys
from kvstore.router import Router
from kvstore.trust import ClusterSecret

NODE = """
import os, sys, time
from kvstore.cluster import ClusterIndex
from kvstore.trust import ClusterSecret
keys = [bytes.fromhex(k) for k in sys.stdin.readline().split()]
secret = ClusterSecret.read(os.environ["KVSTORE_CLUSTER_SECRET"])
index = ClusterIndex(sys.argv[1], "doomed", "doomed:1", lambda: [(k, "host") for k in keys],
                     secret=secret)
while index.stats().republishes < 1:
    time.sleep(0.01)
print("ready", flush=True)
sys.stdin.read()
"""


class RedisServer:
    """A redis-server on a fixed port that can be SIGKILLed and started again, empty."""

    def __init__(self, procs: Processes, cluster: bool = False) -> None:
        self.procs, self.dir = procs, procs.tempdir()
        self.port = bus_free_port() if cluster else free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, *flags: str) -> None:
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--enable-debug-command",
            "local",
            *flags,
        ]
        self.proc = self.procs.spawn(cmd, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        until(lambda: _pings(client), 10)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def bus_free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def until(condition: Callable[[], object], timeout: float, step: float = 0.005) -> float:
    """Seconds until `condition()` holds; raises after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"not reached within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start


def prompt(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, tokens)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def timed(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(n, 50)):  # warm up
        call()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return samples


def node_set(url: str, holdings: list[list[tuple[bytes, str]]], **kw) -> list[ClusterIndex]:
    nodes = [
        ClusterIndex(
            url,
            f"node{i}",
            f"10.0.0.{i}:7600",
            partial(iter, h),
            **kw,
            secret=ClusterSecret.read(cluster_secret()),
        )
        for i, h in enumerate(holdings)
    ]
    until(lambda: all(n.stats().republishes >= 1 for n in nodes), 600, 0.05)
    return nodes


def close(nodes: list[ClusterIndex]) -> None:
    for n in nodes:
        n.close()


def bench_locate(url: str, n: int) -> list[dict]:
    tokens = prompt(131072)
    keys = block_keys(tokens, 256)  # 512
    rows = []
    layouts = {
        "overlapping": [[(k, TIERS[i % 3]) for k in keys[: 32 * (i + 1)]] for i in range(16)],
        "all_hold_all": [[(k, TIERS[i % 3]) for k in keys] for i in range(16)],
    }
    raw = redis.Redis.from_url(url)
    for layout, holdings in layouts.items():
        nodes = node_set(url, holdings)
        with Router(url, seed=0, secret=cluster_secret()) as router:
            for n_tokens in (1024, 32768, 131072):
                prefix = keys[: n_tokens // 256]
                raw.config_resetstat()
                locate = timed(partial(router.locate, prefix), n)
                stats = raw.info("commandstats").get("cmdstat_evalsha", {})
                hashed = timed(partial(router.locate_tokens, tokens[:n_tokens], 256), n // 4)
                rows.append(
                    {
                        "layout": layout,
                        "prompt_tokens": n_tokens,
                        "keys": len(prefix),
                        "nodes_matched": len(router.locate(prefix)),
                        **percentiles(locate),
                        "tokens": percentiles(hashed),
                        "redis_us_per_call": stats.get("usec_per_call"),
                    }
                )
        close(nodes)
        raw.flushall()
    return rows


def bench_cluster_locate(procs: Processes, n: int) -> list[dict]:
    """The overlapping layout on a 3-shard Redis Cluster: pipelined reads, runs counted here."""
    shards = [RedisServer(procs, cluster=True) for _ in range(3)]
    for shard in shards:
        shard.start("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    addresses = [f"127.0.0.1:{s.port}" for s in shards]
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
    )
    clients = [redis.Redis(port=s.port) for s in shards]
    until(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients), 30)
    url = f"redis+cluster://{addresses[0]}"
    keys = block_keys(prompt(131072), 256)
    nodes = node_set(url, [[(k, TIERS[i % 3]) for k in keys[: 32 * (i + 1)]] for i in range(16)])
    rows = []
    with Router(url, seed=0, secret=cluster_secret()) as router:
        for n_tokens in (1024, 32768, 131072):
            prefix = keys[: n_tokens // 256]
            samples = timed(partial(router.locate, prefix), n)
            rows.append(
                {
                    "layout": "overlapping",
                    "shards": 3,
                    "prompt_tokens": n_tokens,
                    "keys": len(prefix),
                    **percentiles(samples),
                }
            )
    close(nodes)
    return rows


def bench_memory(url: str, blocks: int) -> list[dict]:
    raw = redis.Redis.from_url(url)
    rows = []
    for holders in ("1", "2", "3", "1-3"):
        raw.flushall()
        base = _settled_memory(raw)
        rng = random.Random(1)
        keys = [rng.randbytes(16) for _ in range(blocks)]
        held: list[list[tuple[bytes, str]]] = [[], [], []]
        for key in keys:
            count = rng.randint(1, 3) if holders == "1-3" else int(holders)
            for node in rng.sample(range(3), count):
                held[node].append((key, TIERS[rng.randrange(3)]))
        nodes = node_set(url, held, ttl_s=600, heartbeat_s=60)
        entries = sum(map(len, held))
        used = _settled_memory(raw) - base
        sizes = (raw.memory_usage(b"kv:b" + k, samples=0) for k in keys[:1000])
        sample = [n for n in sizes if n is not None]  # None: a missing key
        rows.append(
            {
                "holders": holders,
                "blocks": blocks,
                "entries": entries,
                "bytes_per_entry": used / entries,
                "bytes_per_block": used / blocks,
                "memory_usage_per_block_key": float(np.mean(sample)),
                "encoding": raw.object("encoding", b"kv:b" + keys[0]).decode(),
            }
        )
        close(nodes)
    raw.flushall()
    return rows


def _settled_memory(raw: redis.Redis) -> int:
    """used_memory once the main dict is not rehashing (two tables would count twice)."""
    until(lambda: b"rehashing target" not in raw.execute_command("DEBUG", "HTSTATS", "0"), 30)
    return raw.info("memory")["used_memory"]


def bench_republish(url: str, blocks: int) -> dict:
    rng = random.Random(2)
    entries = [(rng.randbytes(16), "host") for _ in range(blocks)]
    start = time.monotonic()
    nodes = node_set(url, [entries], ttl_s=600, heartbeat_s=60)
    elapsed = time.monotonic() - start
    close(nodes)
    redis.Redis.from_url(url).flushall()
    return {"entries": blocks, "seconds": elapsed, "entries_per_s": blocks / elapsed}


def bench_absence(procs: Processes, url: str, runs: int) -> dict:
    keys = block_keys(prompt(1024, seed=5), 256)
    seconds = []
    with Router(url, secret=cluster_secret()) as router:
        for _ in range(runs):
            proc = procs.spawn(
                [sys.executable, "-c", NODE, url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None and proc.stdout is not None  # piped
            proc.stdin.write(" ".join(k.hex() for k in keys) + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            seconds.append(until(lambda: not router.locate(keys), 30))
    return {"heartbeat_s": 1.0, "ttl_s": 5.0, "seconds": seconds}


def bench_converge(server: RedisServer, per_node: int) -> dict:
    chains = [block_keys(prompt(per_node * 16, seed=10 + i), 16) for i in range(16)]
    nodes = node_set(server.url, [[(k, "host") for k in c] for c in chains])
    probes = [c[:64] for c in chains]

    def converged() -> bool:
        try:
            return all(
                [(loc.node_id, loc.matched) for loc in router.locate(p)] == [(f"node{i}", 64)]
                for i, p in enumerate(probes)
            )
        except Exception:  # Redis still down
            return False

    with Router(server.url, secret=cluster_secret()) as router:
        assert converged()
        killed = time.monotonic()
        server.kill()
        server.start()
        restarted = time.monotonic()
        until(converged, 120, 0.01)
        done = time.monotonic()
    close(nodes)
    return {
        "nodes": 16,
        "entries": 16 * per_node,
        "down_s": restarted - killed,
        "from_restart_s": done - restarted,
        "from_kill_s": done - killed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer samples and blocks")
    args = parser.parse_args()
    n, shrink = (200, 10) if args.quick else (2000, 1)  # samples; divisor of block counts
    with Processes() as procs:
        server = RedisServer(procs)
        server.start()
        sections = {
            "locate": lambda: bench_locate(server.url, n),
            "cluster_locate": lambda: bench_cluster_locate(procs, n),
            "memory": lambda: bench_memory(server.url, 100_000 // shrink),
            "republish": lambda: bench_republish(server.url, 200_000 // shrink),
            "absence": lambda: bench_absence(procs, server.url, 1 if args.quick else 3),
            "converge": lambda: bench_converge(server, 10_000 // shrink),
        }
        results = {"redis": redis.Redis.from_url(server.url).info("server")["redis_version"]}
        for name, measure in sections.items():
            results[name] = measure()
            if args.json:  # as it goes: a later failure keeps what was measured
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
