"""kvstore-bench cluster: the location index and the data between nodes, measured through
real daemons and a real redis-server, next to ceilings in the same run.

- locate: p50/p99 for prompts of 1k, 32k and 128k tokens (256-token blocks), 16 nodes
  holding overlapping prefixes (registration-only writers), through `Router` and through
  a node's Locate RPC;
- put with --cluster over put without, same run (the index is off the request path);
- memory: Redis bytes per indexed (block, node) entry;
- absence: seconds from SIGKILL of a daemon to its absence from Locate;
- converge: seconds for the index to be whole again after Redis restarts empty;
- fetch: a node pulling blocks another holds (4 MiB and 256 KiB) over its data plane,
  against `push` of the same blocks and raw TCP between two processes;
- handoff: a producer process puts a prompt to node A batch by batch; a consumer asks
  node B (`get(wait=, fetch=True)`) before the producer starts: the consumer's last byte
  after the producer's last put, p50/p99, against the time of the last batch alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

import numpy as np

from kvstore.bench import ceilings, cluster_index_bench
from kvstore.bench.measure import Run, Workload, source_bytes
from kvstore.bench.procs import Processes, cluster_secret
from kvstore.bench.report import Row
from kvstore.client import Client
from kvstore.cluster import TIERS
from kvstore.keys import block_keys
from kvstore.router import Router

HELP = "cluster index, fetch-through and cross-node handoff, through real daemons"
FAST = ("--heartbeat", "0.2", "--node-ttl", "1.0", "--log-level", "error")
MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--calls", type=int, default=300, help="locates per prompt length")
    parser.add_argument("--total", type=int, default=256 << 20, help="bytes per transfer row")


def check(args: argparse.Namespace) -> str:
    return "--calls must be at least 20" if args.calls < 20 else ""


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    progress.update(task, total=7)
    url = procs.redis()
    if url is None:
        raise SystemExit("kvstore-bench cluster needs redis-server on PATH")
    step = lambda what: progress.update(task, advance=1, description=what)  # noqa: E731
    rows = locate_rows(procs, url, args.calls)
    step("locate")
    rows += put_overhead_rows(procs, url, args.total, args.repeat, args.seed)
    step("puts with and without --cluster")
    rows += [memory_row(procs)]
    step("index memory")
    rows += [absence_row(procs, url)]
    step("absence after SIGKILL")
    rows += [converge_row(procs)]
    step("convergence after a Redis restart")
    rows += fetch_rows(procs, url, args.total, args.seed)
    step("fetch-through")
    rows += handoff_rows(procs, url, args.repeat, args.seed)
    step("cross-node handoff")
    return rows


def _node(procs: Processes, url: str, name: str, *flags: str) -> str:
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
    node = _node(procs, url, "answering")
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
        _node(procs, url, "indexed", "--host-capacity", str(2 * total)), transport="tcp"
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


def fetch_rows(procs: Processes, url: str, total: int, seed: int) -> list[Row]:
    """Blocks on node A, pulled by node B for a client of B; vs A pushing them to B, vs
    raw TCP between two processes, same bytes."""
    source = source_bytes(total, seed)
    capacity = str(2 * total + (64 << 20))
    a = _node(procs, url, "holder", "--host-capacity", capacity)
    rows = []
    port = ceilings.start_server(procs, "tcp")
    for size in (4 * MiB, 256 << 10):
        work = Workload(size, total, max(1, (64 << 20) // size))
        ceiling = ceilings.raw_tcp(port, work, source, "put")
        n = total // size
        for path in ("fetch", "push"):
            b = _node(procs, url, f"{path}-{size}", "--host-capacity", capacity)
            keys = block_keys(np.arange(n), 1, f"fetch/{path}/{size}/{seed}".encode())
            with Client(a, transport="tcp") as ca, Client(b) as cb:
                for i in range(0, n, work.batch):
                    part = range(i, min(i + work.batch, n))
                    ca.put(
                        [keys[j] for j in part], [source[j * size : (j + 1) * size] for j in part]
                    )
                with Router(url, secret=cluster_secret()) as router:
                    cluster_index_bench.until(partial(router.locate, keys[-1:]), 30)
                latencies = []
                start = time.perf_counter()
                for i in range(0, n, work.batch):
                    batch = keys[i : i + work.batch]
                    t = time.perf_counter()
                    if path == "fetch":
                        assert cb.lookup(batch, fetch=True) == len(batch)
                    else:
                        assert ca.push(batch, b, "tcp").stored == len(batch)
                    latencies.append(time.perf_counter() - t)
                row = Row.of(path, "tcp", size, Run(total, time.perf_counter() - start, latencies))
                assert row.gbps is not None  # total > 0 bytes moved
                row.ratios["raw_tcp"] = round(row.gbps / ceiling.gbps, 3)
                rows.append(row)
        rows.append(Row.of("put", "raw_tcp", size, ceiling))
    return rows  # fmt: skip


def handoff_rows(procs: Processes, url: str, repeat: int, seed: int) -> list[Row]:
    """A producer puts 32 blocks of 4 MiB to A in batches of 4; a consumer asked B first."""
    a = _node(procs, url, "prefill", "--host-capacity", "1GiB")
    b = _node(procs, url, "decode", "--host-capacity", "1GiB")
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
