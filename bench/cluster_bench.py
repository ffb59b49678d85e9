"""kvstore-bench cluster: the location index and the data between nodes, measured through
real daemons and a real redis-server, next to ceilings in the same run.

- locate: p50/p99 for prompts of 1k, 32k and 128k tokens (256-token blocks), 16 nodes
  holding overlapping prefixes (registration-only writers), through `Router` and through
  a node's Locate RPC;
- put with --cluster over put without, same run (the index is off the request path);
- memory: Redis bytes per indexed (block, node) entry;
- absence: seconds from SIGKILL of a daemon to its absence from Locate;
- converge: seconds for the index to be whole again after Redis restarts empty;
- fetch: a node pulling blocks another holds (32 of 4 MiB, 128 of 256 KiB) over NIXL and
  over its TCP data plane, and `push` of the same blocks, against raw NIXL and raw TCP
  between two processes;
- handoff: a producer process puts a prompt to node A batch by batch; a consumer asks
  node B (`get(wait=, fetch=True)`) before the producer starts: the consumer's last byte
  after the producer's last put, p50/p99, against the time of the last batch alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

import numpy as np

from kvstore.bench import ceilings, cluster_index_bench
from kvstore.bench.measure import Run, Workload, median, source_bytes
from kvstore.bench.procs import Processes, cluster_secret
from kvstore.bench.report import Row
from kvstore.client import Client
from kvstore.cluster import TIERS
from kvstore.keys import block_keys
from kvstore.router import Router

HELP = "cluster index, fetch-through and cross-node handoff, through real daemons"
FAST = ("--heartbeat", "0.2", "--node-ttl", "1.0", "--log-level", "error")
MiB = 1 << 20
NODE_TO_NODE = ((4 * MiB, 32), (256 << 10, 128))  # (block size, blocks) moved in one request
MOVES = (("fetch", "nixl"), ("fetch", "tcp"), ("push", "nixl"), ("push", "tcp"))
SECTIONS = ("locate", "put", "memory", "absence", "converge", "fetch", "handoff")


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--calls", type=int, default=300, help="locates per prompt length")
    parser.add_argument("--total", type=int, default=256 << 20, help="bytes per put row")
    parser.add_argument(
        "--sections", type=choices(SECTIONS), default=list(SECTIONS), help="what to measure"
    )


def check(args: argparse.Namespace) -> str:
    return "--calls must be at least 20" if args.calls < 20 else ""


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    url = procs.redis()
    if url is None:
        raise SystemExit("kvstore-bench cluster needs redis-server on PATH")
    sections = {
        "locate": lambda: locate_rows(procs, url, args.calls),
        "put": lambda: put_overhead_rows(procs, url, args.total, args.repeat, args.seed),
        "memory": lambda: [memory_row(procs)],
        "absence": lambda: [absence_row(procs, url)],
        "converge": lambda: [converge_row(procs)],
        "fetch": lambda: fetch_rows(procs, url, args.repeat, args.seed),
        "handoff": lambda: handoff_rows(procs, url, args.repeat, args.seed),
    }
    progress.update(task, total=len(args.sections))
    rows = []
    for name in args.sections:
        rows += sections[name]()
        progress.update(task, advance=1, description=name)
    return rows


def cluster_node(procs: Processes, url: str, name: str, *flags: str) -> str:
    return procs.daemon("--cluster", url, "--node-id", name, *FAST, *flags)


def _ms(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50) * 1e3), float(np.percentile(samples, 99) * 1e3)


def _row(scenario: str, path: str, p50: float, p99: float, **extra: Any) -> Row:
    return Row(scenario, path, 0, 0, None, round(p50, 3), round(p99, 3), extra=extra)


def locate_rows(procs: Processes, url: str, calls: int) -> list[Row]:
    """16 registration-only writers with overlapping prefixes; one daemon answers Locate."""
    keys = block_keys(cluster_index_bench.prompt(131072), 256)
    holdings = [[(k, TIERS[i % 3]) for k in keys[: 32 * (i + 1)]] for i in range(16)]
    writers = cluster_index_bench.node_set(url, holdings)
    node = cluster_node(procs, url, "answering")
    rows = []
    try:
        with Router(url, seed=0, secret=cluster_secret()) as router, Client(node) as client:
            for tokens in (1024, 32768, 131072):
                prefix = keys[: tokens // 256]
                for path, call in (("router", router.locate), ("rpc", client.locate)):
                    samples = cluster_index_bench.timed(partial(call, prefix), calls)
                    p50, p99 = _ms(samples)
                    rows.append(
                        _row("locate", path, p50, p99, prompt_tokens=tokens, nodes=16,
                             keys=len(prefix))
                    )  # fmt: skip
    finally:
        cluster_index_bench.close(writers)
    return rows


def put_overhead_rows(procs: Processes, url: str, total: int, repeat: int, seed: int) -> list[Row]:
    """4 MiB puts over TCP to a node with --cluster and to one without, alternating."""
    source = source_bytes(total, seed)
    size = 4 * MiB
    with_index = Client(
        cluster_node(procs, url, "indexed", "--host-capacity", str(2 * total)), transport="tcp"
    )
    alone = Client(
        procs.daemon("--host-capacity", str(2 * total), "--log-level", "error"), transport="tcp"
    )
    rates: dict[str, list[float]] = {"cluster": [], "alone": []}
    for rep in range(repeat + 1):
        for name, client in (("cluster", with_index), ("alone", alone)):
            keys = block_keys(np.arange(total // size), 1, f"overhead/{rep}/{name}".encode())
            start = time.perf_counter()
            for i in range(0, len(keys), 16):
                batch = range(i, min(i + 16, len(keys)))
                client.put(
                    [keys[j] for j in batch], [source[j * size : (j + 1) * size] for j in batch]
                )
            if rep:  # the first round warms up
                rates[name].append(total / (time.perf_counter() - start) / 1e9)
            client.delete(keys)
    with_index.close()
    alone.close()
    cluster, plain = statistics.median(rates["cluster"]), statistics.median(rates["alone"])
    row = Row("put", "tcp+cluster", size, total, round(cluster, 4), 0, 0)
    row.ratios["without_cluster"] = round(cluster / plain, 3)
    return [row, Row("put", "tcp", size, total, round(plain, 4), 0, 0)]  # fmt: skip


def memory_row(procs: Processes) -> Row:
    server = cluster_index_bench.RedisServer(procs)  # of its own: nothing else in it
    server.start()
    measured = cluster_index_bench.bench_memory(server.url, 100_000)
    mixed = next(m for m in measured if m["holders"] == "1-3")
    by_holders = {m["holders"]: round(m["bytes_per_entry"], 1) for m in measured}
    entry = round(mixed["bytes_per_entry"], 1)
    return _row("index-memory", "redis", 0, 0, bytes_per_entry=entry, by_holders=by_holders)


def absence_row(procs: Processes, url: str) -> Row:
    """Seconds from SIGKILL of a daemon (heartbeat 0.2 s, TTL 1 s) to its absence."""
    keys = block_keys(np.arange(4 * 16), 16, b"absence")
    seconds = []
    with Router(url, secret=cluster_secret()) as router:
        for run in range(3):
            proc = procs.spawn(
                [sys.executable, "-m", "kvstore.server", "--address", "127.0.0.1:0",
                 "--cluster", url, "--node-id", f"doomed{run}", *FAST],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert proc.stdout is not None  # piped
            address = proc.stdout.readline().split("listening on ")[1].split()[0]
            with Client(address) as c:
                c.put(keys, [b"x"] * 4)
            cluster_index_bench.until(partial(router.locate, keys), 30)
            proc.send_signal(signal.SIGKILL)
            proc.wait()

            def absent(keys: list[bytes] = keys) -> bool:
                return not router.locate(keys)

            seconds.append(cluster_index_bench.until(absent, 30))
            keys = block_keys(np.arange(4 * 16), 16, f"absence{run}".encode())
    return _row("absence", "daemon", statistics.median(seconds) * 1e3, max(seconds) * 1e3,
                heartbeat_s=0.2, node_ttl_s=1.0, seconds=seconds)  # fmt: skip


def converge_row(procs: Processes) -> Row:
    server = cluster_index_bench.RedisServer(procs)
    server.start()
    result = cluster_index_bench.bench_converge(server, 10_000)
    return _row("converge", "redis-restart", result["from_restart_s"] * 1e3,
                result["from_kill_s"] * 1e3, **result)  # fmt: skip


def fetch_rows(procs: Processes, url: str, repeat: int, seed: int) -> list[Row]:
    """Blocks on node A fetched through node B (a client of B asks, B pulls them from A), and
    pushed by A to B, all of a row's blocks in one request: over NIXL (both nodes run it)
    and over the TCP data plane (B with --nixl off). Against, in the same run, raw TCP and
    two bare NIXL agents in two processes, one WRITEing the same bytes into the other's
    registered memory. Medians of `repeat` runs after a warm-up."""
    capacity = ("--host-capacity", "1GiB")
    a = cluster_node(procs, url, "holder", *capacity)
    targets = {
        "nixl": cluster_node(procs, url, "nixl-b", *capacity),
        "tcp": cluster_node(procs, url, "tcp-b", *capacity, "--nixl", "off"),
    }
    ports = {name: ceilings.start_server(procs, name) for name in ("nixl", "tcp")}
    rows = []
    ucx = os.environ.get("UCX_TLS", "default")  # UCX's transports: every process's
    clients = {path: Client(b) for path, b in targets.items()}  # warm after the first run
    with Client(a) as ca, Router(url, secret=cluster_secret()) as router:
        for size, n in NODE_TO_NODE:
            source = source_bytes(size * n, seed)
            work = Workload(size, size * n, n)
            runs: dict[tuple[str, str], list[Run]] = {}
            for rep in range(repeat + 1):  # the first one warms up, untimed
                measured = {
                    ("get", "raw_nixl"): ceilings.raw_nixl(ports["nixl"], work, source, "get"),
                    ("get", "raw_tcp"): ceilings.raw_tcp(ports["tcp"], work, source, "get"),
                }
                for scenario, path in MOVES:
                    keys = block_keys(np.arange(n), 1, f"{scenario}/{path}/{size}/{rep}".encode())
                    measured[scenario, path] = _node_to_node(
                        ca, clients[path], router, targets[path], scenario, keys, source, size
                    )
                for name, run in measured.items():
                    if rep:
                        runs.setdefault(name, []).append(run)
            ceiling = {path: median(runs["get", path]) for path in ("raw_nixl", "raw_tcp")}
            for (scenario, path), done in runs.items():
                row = Row.of(scenario, path, size, median(done), blocks=n, ucx_tls=ucx)
                if row.is_kvstore:
                    row.ratios = {
                        c: round((row.gbps or 0) / (ceiling[c].gbps or 1), 3) for c in ceiling
                    }
                rows.append(row)
    for client in clients.values():
        client.close()
    return rows


def _node_to_node(
    ca: Client,
    cb: Client,
    router: Router,
    b: str,
    scenario: str,
    keys: list[bytes],
    source: np.ndarray,
    size: int,
) -> Run:
    """One request's move of `keys` from A to B (B's path: NIXL, or TCP), timed; then
    gone from both."""
    ca.put(keys, [source[i * size : (i + 1) * size] for i in range(len(keys))])
    if scenario == "fetch":
        cluster_index_bench.until(partial(router.locate, keys[-1:]), 30)
    start = time.perf_counter()
    if scenario == "fetch":
        assert cb.lookup(keys, fetch=True) == len(keys)
    else:
        assert ca.push(keys, b).stored == len(keys)
    seconds = time.perf_counter() - start
    cb.delete(keys)
    ca.delete(keys)
    return Run(len(keys) * size, seconds, [seconds])


def handoff_rows(procs: Processes, url: str, repeat: int, seed: int) -> list[Row]:
    """A producer puts 32 blocks of 4 MiB to A in batches of 4; a consumer asked B first."""
    a = cluster_node(procs, url, "prefill", "--host-capacity", "1GiB")
    b = cluster_node(procs, url, "decode", "--host-capacity", "1GiB")
    size, n, batch = 4 * MiB, 32, 4
    lags, lasts = [], []
    for rep in range(repeat + 1):
        keys = block_keys(np.arange(n), 1, f"handoff/{rep}/{seed}".encode())
        ctx = mp.get_context("spawn")
        done = ctx.Queue()
        producer = ctx.Process(target=_produce, args=(a, keys, size, batch, seed, done))
        with Client(b) as consumer:
            consumer.lookup(keys[:1])  # connections open before the clock runs
            got: list[np.ndarray] = []
            producer.start()
            got = consumer.get(keys, wait=120, fetch=True)
            received = time.time()
        producer.join()
        _, last_put, last_batch = done.get(timeout=60)
        assert len(got) == n
        if rep:
            lags.append(received - last_put)
            lasts.append(last_batch)
    p50, p99 = _ms(lags)
    row = _row("handoff", "fetch", p50, p99, blocks=n, block_size=size,
               last_batch_ms=round(statistics.median(lasts) * 1e3, 3))  # fmt: skip
    row.ratios["last_batch"] = round(statistics.median(lags) / statistics.median(lasts), 3)
    return [row]


def _produce(address: str, keys: list[bytes], size: int, batch: int, seed: int, done) -> None:
    source = source_bytes(len(keys) * size, seed)
    with Client(address) as client:
        client.lookup(keys[:1])
        first = time.time()
        for i in range(0, len(keys), batch):
            t = time.perf_counter()
            client.put(
                keys[i : i + batch],
                [source[j * size : (j + 1) * size] for j in range(i, i + batch)],
            )
            last_batch = time.perf_counter() - t
        done.put((first, time.time(), last_batch))  # fmt: skip
