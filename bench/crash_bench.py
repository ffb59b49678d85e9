"""kvstore-bench crash: a node with a disk tier is SIGKILLed under concurrent puts, again
and again, and restarted on the same directory; every block ever acknowledged is checked
byte for byte.

Each loop: client threads in several processes (over `--transports`, round robin) put
batches of blocks, some durable (`--durable` of the batches), until the node is killed at
a seeded random moment; the node is started again on the same `--disk-dir` (the restart
time runs from the spawn to its banner line) and every key the loop put is read back,
with those of the `--recheck` loops before it; after the last loop, every key ever
acknowledged is. Keys and payloads follow from the seed, the loop, the thread and the
block's index, so the checker keeps no bytes, only what each thread put and which batch
was in flight.

- acknowledged: blocks whose put returned success.
- corrupt: a get that returned other bytes than the key's put carried (or raised
  `CorruptBlock`: checksums are on), whichever loop the key is of.
- phantom: blocks on the restarted node that no put acknowledged nor had in flight: the
  disk tier's blocks at the restart, less those of the restart before, less the keys of
  this loop found present (the host tier is empty at a restart and nothing is deleted).
- lost: acknowledged non-durable blocks missing after the restart; the README's bound is
  what the host tier may hold not yet on disk: `--dirty-ratio` of it plus one demotion
  batch in flight, in payload bytes, per loop.
- durable lost: acknowledged durable blocks missing after the restart (must be 0).
- earlier lost: blocks found after an earlier restart and missing at a later one.
A put in flight at the kill may land or not; one that lands must land whole and right.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import signal
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench.procs import Processes
from kvstore.bench.report import Row
from kvstore.bench.soak_bench import payload, start_node
from kvstore.client import Client
from kvstore.config import parse_size
from kvstore.errors import CorruptBlock
from kvstore.store import DEMOTE_BATCH

HELP = "SIGKILL loops under concurrent puts with a disk tier; every acknowledged block checked"
GET_BYTES = 16 << 20  # bytes asked per get while checking
SAMPLES = 10  # keys named per kind of failure in the JSON


@dataclass(frozen=True)
class Load:
    """What every client thread does; sent to the client processes."""

    seed: int
    sizes: tuple[int, ...]
    batch: int
    durable: float
    rate: float  # bytes per second per thread; 0: as fast as the node takes them
    transports: tuple[str, ...]

    def keys(self, loop: int, thread: int, batch: int) -> list[bytes]:
        first = batch * self.batch
        return [block_key(self.seed, loop, thread, i) for i in range(first, first + self.batch)]

    def is_durable(self, keys: list[bytes]) -> bool:
        return keys[0][15] < round(256 * self.durable)

    def size(self, key: bytes) -> int:
        """The payload size of `key` (as `payload` draws it)."""
        return self.sizes[key[8] % len(self.sizes)] // 8 * 8


def block_key(seed: int, loop: int, thread: int, index: int) -> bytes:
    """Block `index` of `thread` in `loop`: the same 16 bytes in every process and run."""
    data = struct.pack("<qqqq", seed, loop, thread, index)
    return hashlib.blake2b(data, digest_size=16, person=b"kvstore-crash").digest()


@dataclass
class Put:
    """One thread's loop: batches 0..batches-1 were tried; those in `uncertain` failed
    (in flight at the kill, or an error before it) and may or may not have landed."""

    thread: int
    batches: int = 0
    uncertain: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def put_thread(load: Load, address: str, loop: int, thread: int, stop: Any, out: Put) -> None:
    """Put batch after batch until the node dies (the parent sets `stop` right after the
    kill); a failure before the kill is counted as an error, and the puts go on."""
    transport = load.transports[thread % len(load.transports)]
    client = Client(address, transport=transport, timeout=30)
    due = time.monotonic()
    try:
        while not stop.is_set():
            keys = load.keys(loop, thread, out.batches)
            payloads = [payload(k, load.sizes) for k in keys]
            b, out.batches = out.batches, out.batches + 1
            try:
                result = client.put(keys, payloads, durable=load.is_durable(keys))
            except Exception as exc:
                out.uncertain.append(b)
                if stop.wait(2.0):  # the kill: this batch was in flight
                    return
                out.errors.append(f"{transport}: {exc!r}")
                client.close()
                client = Client(address, transport=transport, timeout=30)
                continue
            if result.stored + result.existed != len(keys):
                out.uncertain.append(b)
                out.errors.append(f"{transport}: acknowledged {result} of {len(keys)}")
            if load.rate:
                due = max(due, time.monotonic() - 0.5) + sum(p.nbytes for p in payloads) / load.rate
                stop.wait(max(0.0, due - time.monotonic()))
    finally:
        client.close()


def client_process(load: Load, threads: list[int], stop: Any, commands: Any, results: Any) -> None:
    """Some of the threads, loop after loop: (address, loop) in, their `Put`s out."""
    try:
        while (command := commands.get()) is not None:
            address, loop = command
            puts = [Put(t) for t in threads]
            workers = [
                threading.Thread(target=put_thread, args=(load, address, loop, p.thread, stop, p))
                for p in puts
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            results.put(puts)
    except Exception:  # reported to the parent, which fails loudly
        results.put(traceback.format_exc())


CORRUPT = object()


def walk(client: Client, keys: list[bytes], per_get: int) -> Iterator[Any]:
    """Each key's block as got (an array), None when missing, CORRUPT when its checksum
    failed; in order, a get of many keys at a time (a missing key ends a get's prefix)."""
    i = 0
    while i < len(keys):
        part = keys[i : i + per_get]
        try:
            blocks = client.get(part)
        except CorruptBlock:  # which ones: one at a time
            for key in part:
                try:
                    yield next(iter(client.get([key])), None)
                except CorruptBlock:
                    yield CORRUPT
            i += len(part)
            continue
        yield from blocks
        i += len(blocks)
        if len(blocks) < len(part):
            yield None
            i += 1


@dataclass
class Check:
    """What one restart found, for one loop's keys or for earlier loops'."""

    acknowledged: int = 0
    acknowledged_bytes: int = 0
    durable: int = 0
    in_flight: int = 0
    landed: int = 0
    corrupt: int = 0
    lost: int = 0
    lost_bytes: int = 0
    durable_lost: int = 0
    earlier_lost: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    def sample(self, kind: str, thread: int, index: int) -> None:
        names = self.samples.setdefault(kind, [])
        if len(names) < SAMPLES:
            names.append(f"thread {thread} block {index}")


class Checker:
    """Reads keys back through a node and compares them with what their puts carried."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.per_get = max(1, GET_BYTES // max(load.sizes))
        self.puts: dict[int, list[Put]] = {}  # loop -> its threads' puts
        self.gone: dict[int, set[tuple[int, int]]] = {}  # loop -> acknowledged, not found

    def entries(self, loop: int, acknowledged_only: bool) -> Iterator[tuple[bytes, int, int, str]]:
        """(key, thread, index, kind) of every block the loop's puts tried: kind is
        `durable`, `acked` or `flight`."""
        for put in self.puts[loop]:
            uncertain = set(put.uncertain)
            for b in range(put.batches):
                keys = self.load.keys(loop, put.thread, b)
                if b in uncertain:
                    kind = "flight"
                else:
                    kind = "durable" if self.load.is_durable(keys) else "acked"
                if acknowledged_only and kind == "flight":
                    continue
                for j, key in enumerate(keys):
                    yield key, put.thread, b * self.load.batch + j, kind

    def check(self, client: Client, loop: int, own: bool) -> Check:
        """This loop's keys after the restart that followed it (`own`), or an earlier
        loop's acknowledged keys that were found then."""
        found = Check()
        gone = self.gone.setdefault(loop, set())
        entries = [e for e in self.entries(loop, not own) if own or (e[1], e[2]) not in gone]
        blocks = walk(client, [e[0] for e in entries], self.per_get)
        for (key, thread, index, kind), block in zip(entries, blocks, strict=True):
            if kind == "flight":
                found.in_flight += 1
            else:
                found.acknowledged += 1
                found.acknowledged_bytes += self.load.size(key)
                found.durable += kind == "durable"
            if block is None:
                if not own:
                    found.earlier_lost += 1
                    found.sample("earlier_lost", thread, index)
                elif kind == "durable":
                    found.durable_lost += 1
                    found.sample("durable_lost", thread, index)
                elif kind == "acked":
                    found.lost += 1
                    found.sample("lost", thread, index)
                    found.lost_bytes += self.load.size(key)
                if kind != "flight":
                    gone.add((thread, index))
                continue
            found.landed += own and kind == "flight"
            got = None if block is CORRUPT else np.asarray(block).view(np.uint8).reshape(-1)
            if got is None or not np.array_equal(got, payload(key, self.load.sizes)):
                found.corrupt += 1
                found.sample("corrupt", thread, index)
                gone.add((thread, index))
        return found


def disk_blocks(client: Client) -> int:
    """Blocks on the node's disk tier: at a restart, every block it holds."""
    return sum(t.blocks for t in client.stats().tiers if t.name == "disk")


class Crash:
    """The loops: one node at a time on one directory, client processes kept across loops."""

    def __init__(self, args: argparse.Namespace, procs: Processes) -> None:
        self.args, self.procs = args, procs
        self.load = Load(
            args.seed, tuple(args.block_sizes), args.batch, args.durable,
            args.rate / args.threads, tuple(args.transports),
        )  # fmt: skip
        self.scratch = Path(args.dir or procs.tempdir())
        self.disk = self.scratch / "disk"
        self.disk.mkdir(parents=True, exist_ok=True)
        self.bound = int(args.dirty_ratio * args.host_capacity) + DEMOTE_BATCH
        self.checker = Checker(self.load)
        low, high = args.kill_after
        self.kill_after = np.random.default_rng(args.seed).uniform(low, high, args.loops)

    def start(self, loop: int) -> tuple[str, subprocess.Popen, float]:
        a = self.args
        t = time.monotonic()
        address, proc = start_node(
            self.procs, self.scratch / f"node-{loop}.log", "--host-capacity", str(a.host_capacity),
            "--disk-dir", str(self.disk), "--disk-capacity", str(a.disk_capacity),
            "--dirty-ratio", str(a.dirty_ratio), "--fsync", a.fsync, "--log-level", "warning",
        )  # fmt: skip
        return address, proc, time.monotonic() - t

    def run(self, progress: Any, task: Any) -> list[Row]:
        a = self.args
        ctx = mp.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        children = []
        for part in np.array_split(np.arange(a.threads), a.processes):
            threads = [int(t) for t in part]  # thread n's transport: the n-th, round robin
            commands = ctx.Queue()
            child = ctx.Process(
                target=client_process,
                args=(self.load, threads, stop, commands, results),
                daemon=True,
            )
            child.start()
            self.procs.callback(child.kill)  # a no-op for one already gone
            children.append((child, commands))
        started = time.monotonic()
        address, node, _ = self.start(0)
        with Client(address, transport="tcp", timeout=60) as client:
            blocks_before = disk_blocks(client)  # 0 unless --dir held a disk tier already
        loops = []
        for loop in range(a.loops):
            progress.update(task, description=f"loop {loop + 1} of {a.loops}")
            stop.clear()
            for _, commands in children:
                commands.put((address, loop))
            time.sleep(float(self.kill_after[loop]))
            node.send_signal(signal.SIGKILL)
            node.wait()
            stop.set()
            reports = [results.get(timeout=120) for _ in children]
            if failed := [r for r in reports if isinstance(r, str)]:
                raise RuntimeError(f"a client process failed:\n{failed[0]}")
            self.checker.puts[loop] = [p for report in reports for p in report]
            address, node, restart_s = self.start(loop + 1)
            with Client(address, transport="tcp", timeout=60) as client:
                blocks = disk_blocks(client)
                own = self.checker.check(client, loop, own=True)
                earlier = [
                    self.checker.check(client, before, own=False)
                    for before in range(max(0, loop - a.recheck), loop)
                ]
            loops.append(
                self.loop_entry(loop, own, earlier, blocks - blocks_before, restart_s, reports)
            )
            blocks_before = blocks
            progress.update(task, advance=1)
        progress.update(task, description="every key ever acknowledged")
        with Client(address, transport="tcp", timeout=60) as client:
            final = [self.checker.check(client, loop, own=False) for loop in range(a.loops)]
        node.terminate()
        node.wait(timeout=60)
        for _, commands in children:
            commands.put(None)
        for child, _ in children:
            child.join(timeout=30)
        return [self.summary(loops, final, time.monotonic() - started)]

    def loop_entry(
        self, loop: int, own: Check, earlier: list[Check], new_blocks: int, restart_s: float,
        reports: list[list[Put]],
    ) -> dict[str, Any]:  # fmt: skip
        """One loop's figures. The node's blocks grew by the keys of this loop found, less
        earlier blocks gone missing, plus phantoms: a surplus is phantoms, a shortfall earlier
        blocks lost (those of loops not read again included)."""
        errors = [e for report in reports for put in report for e in put.errors]
        present = own.acknowledged - own.lost - own.durable_lost + own.landed
        surplus = new_blocks - present
        log = self.scratch / f"node-{loop}.log"  # the killed node's: what it logged
        logged = [line for line in log.read_text().splitlines() if line.strip()]
        entry: dict[str, Any] = {
            "loop": loop,
            "kill_after_s": round(float(self.kill_after[loop]), 3),
            "acknowledged": own.acknowledged,
            "acknowledged_bytes": own.acknowledged_bytes,
            "durable": own.durable,
            "in_flight": own.in_flight,
            "in_flight_landed": own.landed,
            "corrupt": own.corrupt + sum(c.corrupt for c in earlier),
            "phantom": max(0, surplus),
            "lost": own.lost,
            "lost_bytes": own.lost_bytes,
            "bound_bytes": self.bound,
            "within_bound": own.lost_bytes <= self.bound,
            "durable_lost": own.durable_lost,
            "earlier_lost": max(-surplus, sum(c.earlier_lost for c in earlier)),
            "restart_s": round(restart_s, 4),
            "node_blocks": new_blocks,
            "errors": len(errors),
            "node_logged": len(logged),
        }
        samples = {k: v for c in (own, *earlier) for k, v in c.samples.items()}
        if errors:
            samples["errors"] = errors[:SAMPLES]
        if logged:
            samples["node_log"] = logged[:SAMPLES]
        if samples:
            entry["samples"] = samples
        return entry

    def summary(self, loops: list[dict[str, Any]], final: list[Check], seconds: float) -> Row:
        a = self.args

        def total(name: str) -> int:
            return sum(entry[name] for entry in loops)

        failing = ("corrupt", "phantom", "durable_lost", "earlier_lost", "errors")
        restarts = [entry["restart_s"] for entry in loops]
        extra = {
            "loops": len(loops),
            "acknowledged": total("acknowledged"),
            "acknowledged_durable": total("durable"),
            "in_flight": total("in_flight"),
            "in_flight_landed": total("in_flight_landed"),
            "corrupt": total("corrupt") + sum(c.corrupt for c in final),
            "phantom": total("phantom"),
            "lost": total("lost"),
            "lost_bytes_max": max(entry["lost_bytes"] for entry in loops),
            "loss_bound_bytes": self.bound,
            "within_bound": all(entry["within_bound"] for entry in loops),
            "durable_lost": total("durable_lost"),
            "earlier_lost": total("earlier_lost") + sum(c.earlier_lost for c in final),
            "final_checked": sum(c.acknowledged for c in final),
            "restart_s_median": round(float(np.median(restarts)), 4),
            "restart_s_max": round(max(restarts), 4),
            "errors": total("errors"),
            "node_logged": total("node_logged"),
            "loops_failed": [
                e["loop"] for e in loops if not e["within_bound"] or any(e[k] for k in failing)
            ],
            "seconds": round(seconds, 1),
            "seed": a.seed,
            "transports": a.transports,
            "host_capacity": a.host_capacity,
            "dirty_ratio": a.dirty_ratio,
            "fsync": a.fsync,
            "per_loop": loops,
        }
        final_samples = {k: v for c in final for k, v in c.samples.items()}
        if final_samples:
            extra["final_samples"] = final_samples
        restart_ms = [s * 1e3 for s in restarts]
        return Row(
            "crash", "+".join(a.transports), max(a.block_sizes), total("acknowledged_bytes"),
            None, round(float(np.percentile(restart_ms, 50)), 3),
            round(float(np.percentile(restart_ms, 99)), 3), extra=extra,
        )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    def size(text: str) -> int:
        return sizes(text)[0]

    def seconds(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
        if len(values) != 2 or not 0 < values[0] <= values[1]:
            raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX seconds, got {text!r}")
        return values

    parser.add_argument("--loops", type=int, default=10, help="kills and restarts")
    parser.add_argument(
        "--kill-after", type=seconds, default=[0.5, 3.0], metavar="MIN,MAX",
        help="seconds of puts before each kill, drawn uniformly (seeded)",
    )  # fmt: skip
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="client threads in all")
    parser.add_argument(
        "--transports", type=choices(("tcp", "shm", "grpc")), default=["tcp", "shm"],
        help="thread n uses the n-th, round robin",
    )  # fmt: skip
    parser.add_argument("--block-sizes", type=sizes, default=[16 << 10, 64 << 10, 256 << 10])
    parser.add_argument("--batch", type=int, default=8, help="blocks per put")
    parser.add_argument("--durable", type=float, default=0.25, help="share of durable puts")
    parser.add_argument(
        "--rate", type=parse_size, default=64 << 20,
        help="bytes per second put by all threads together; 0: as fast as the node takes them",
    )  # fmt: skip
    parser.add_argument("--recheck", type=int, default=1, help="earlier loops read again")
    parser.add_argument("--host-capacity", type=size, default=256 << 20)
    parser.add_argument("--dirty-ratio", type=float, default=0.25)
    parser.add_argument("--fsync", choices=("batch", "interval", "never"), default="batch")
    parser.add_argument("--disk-capacity", type=size, default=16 << 30)
    parser.add_argument("--dir", type=Path, help="where the disk tier goes (default: a temp dir)")


def check(args: argparse.Namespace) -> str:
    if args.address:
        return "crash starts (and kills) nodes of its own: --address is not for it"
    if args.loops < 1 or args.batch < 1 or args.recheck < 0:
        return "--loops and --batch must be at least 1, --recheck not negative"
    if not 1 <= args.processes <= args.threads:
        return "--processes must be at least 1 and at most --threads"
    if not 0 <= args.durable <= 1 or not 0 <= args.dirty_ratio <= 1:
        return "--durable and --dirty-ratio must be in 0..1"
    if any(size % 8 for size in args.block_sizes):
        return "--block-sizes must be multiples of 8 bytes"
    if args.host_capacity < 4 * args.batch * max(args.block_sizes):
        return "--host-capacity must hold four batches of the largest block"
    return ""


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    """The nodes are the bench's own (it kills them): `--address` is unused."""
    progress.update(task, total=args.loops)
    return Crash(args, procs).run(progress, task)
