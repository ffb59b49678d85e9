"""The rows of `kvstore-bench transfer` about NIXL that are not throughput: one-block
latency against the tcp path (where NIXL starts to pay for small blocks), and the CPU an
idle node and client use with NIXL loaded.

Run as `python -m kvstore.bench.nixl_rows node INLINE_BELOW [kvstore-server flags]` for a
node whose gets send blocks under INLINE_BELOW bytes on the socket (a setting of this
benchmark only), or `... client ADDRESS` for an idle client with a NIXL session open.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from kvstore.bench.measure import Run, Workload, median, timed_batches
from kvstore.bench.procs import Processes, listening
from kvstore.bench.report import Row
from kvstore.client import Client
from kvstore.client import nixl as client_nixl
from kvstore.keys import block_keys
from kvstore.server import nixl as server_nixl

CROSSOVER_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
CALLS = 200  # one-block requests per measurement
# Where small blocks go: all on the socket, all through NIXL, or as shipped
# (server INLINE_BELOW for gets, client SMALL_PUT for puts).
SETTINGS = {"nixl:socket": 1 << 62, "nixl:nixl": 0, "nixl": None}


def node(procs: Processes, inline_below: int) -> subprocess.Popen:
    """A `kvstore-server` starting with NIXL on and INLINE_BELOW set (`listening` waits)."""
    launcher = ("kvstore.bench.nixl_rows", "node", str(inline_below))
    return procs.start_daemon("--nixl", "on", "--host-capacity", str(1 << 30), module=launcher)


def crossover(procs: Processes, sizes: list[int], repeat: int) -> list[Row]:
    """One put, then one get, of one block of each size, CALLS times (median of `repeat`
    runs), over tcp and over nixl from and into registered memory, with small blocks on
    the socket, through NIXL, and as shipped. ratios["tcp"]: the tcp path's p50 latency
    over this row's (above 1: nixl is faster)."""
    rows: list[Row] = []
    inline = {p: server_nixl.INLINE_BELOW if t is None else t for p, t in SETTINGS.items()}
    nodes = {path: node(procs, inline_below) for path, inline_below in inline.items()}
    addresses = {path: listening(proc) for path, proc in nodes.items()}  # started together
    for path, threshold in SETTINGS.items():
        small_put = client_nixl.SMALL_PUT if threshold is None else threshold
        proc = nodes[path]
        try:
            if threshold is None:
                rows += _one_block(addresses[path], "tcp", sizes, repeat)
            previous, client_nixl.SMALL_PUT = client_nixl.SMALL_PUT, small_put
            try:
                added = _one_block(addresses[path], path, sizes, repeat)
            finally:
                client_nixl.SMALL_PUT = previous
        finally:
            proc.terminate()  # idle rows come next: no other node running
            proc.wait()
        for row in added:
            row.extra.update(inline_below=inline[path], small_put=small_put)
        rows += added
    tcp = {(r.scenario, r.block_size): r for r in rows if r.path == "tcp"}
    for row in rows:
        other = tcp[row.scenario, row.block_size]
        if row is not other and row.p50_ms:
            row.ratios["tcp"] = round(other.p50_ms / row.p50_ms, 3)
    return rows


def _one_block(address: str, path: str, sizes: list[int], repeat: int) -> list[Row]:
    memory = np.random.default_rng(0).integers(0, 256, 2 * max(sizes), dtype=np.uint8)
    payloads, outs = memory[: max(sizes)], memory[max(sizes) :]
    rows = []
    with Client(address, transport="nixl" if path.startswith("nixl") else path) as client:
        if path != "tcp":
            client.register(memory)  # blocks leave from and land in registered memory
        for size in sizes:
            runs: dict[str, list[Run]] = {"put_one": [], "get_one": []}
            for rep in range(repeat + 1):  # the first warms up, untimed
                keys = block_keys(np.arange(CALLS), 1, f"kvstore-bench/one/{size}/{rep}".encode())
                put, got = _calls(client, keys, payloads[:size], outs[:size])
                client.delete(keys)
                if rep:
                    runs["put_one"].append(put)
                    runs["get_one"].append(got)
            for scenario, measured in runs.items():
                rows.append(Row.of(scenario, path, size, median(measured), batch=1))
    return rows


def _calls(
    client: Client, keys: list[bytes], payload: np.ndarray, out: np.ndarray
) -> tuple[Run, Run]:
    """Each key put alone, then each got alone."""
    work = Workload(payload.nbytes, payload.nbytes * len(keys), 1)

    def get(batch: range) -> None:
        if len(client.get([keys[batch.start]], out=out)) != 1:
            raise AssertionError(f"block {batch.start} did not come back")

    put = timed_batches(work, lambda batch: client.put([keys[batch.start]], [payload]))
    return put, timed_batches(work, get)


def idle(procs: Processes, seconds: float) -> list[Row]:
    """CPU seconds a node and a client (separate processes, a NIXL session open, one put
    and one get done through NIXL) use while idle for `seconds`."""
    node_proc = node(procs, server_nixl.INLINE_BELOW)
    client = procs.spawn(
        [sys.executable, "-m", "kvstore.bench.nixl_rows", "client", listening(node_proc)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None  # piped
    if client.stdout.readline().strip() != "ready":
        raise RuntimeError("the idle client did not open its NIXL session")
    watched = {"node": node_proc.pid, "client": client.pid}
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    time.sleep(seconds)  # the measurement itself: both sides idle
    used = {name: cpu_seconds(pid) - before[name] for name, pid in watched.items()}
    client.stdin.close()
    client.wait()
    return [
        Row("idle", "nixl", 0, 0, None, 0.0, 0.0, extra={
            "process": name, "seconds": seconds, "cpu_s": round(cpu, 3),
            "core_fraction": round(cpu / seconds, 5),
        })
        for name, cpu in used.items()
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _idle_client(address: str) -> None:
    memory = np.zeros(1 << 20, np.uint8)
    keys = block_keys(np.arange(1), 1, b"kvstore-bench/idle")
    with Client(address, transport="nixl") as client:
        client.register(memory)
        client.put(keys, [memory[: 1 << 19]])  # above SMALL_PUT and INLINE_BELOW: NIXL
        client.get(keys, out=memory[1 << 19 :])
        print("ready", flush=True)
        sys.stdin.read()  # idle until the benchmark closes our stdin


if __name__ == "__main__":
    if sys.argv[1] == "node":
        from kvstore.server.main import main

        server_nixl.INLINE_BELOW = int(sys.argv[2])
        sys.exit(main(sys.argv[3:]))
    _idle_client(sys.argv[2])
