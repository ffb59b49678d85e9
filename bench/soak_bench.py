"""kvstore-bench soak: one node with a small host tier and a disk tier under a long mixed
load (put, get, lookup, delete) from many client threads in several processes, with a key
space far larger than both tiers, so blocks are demoted and evicted all the time.

Every get is checked byte for byte against what the key's put carried: a block whose
bytes differ is counted as corrupt, whatever the checksums said. Reported: operations
and p50/p99/p99.9 per operation, errors by kind, corrupt blocks, the node's resident
memory over time (flat within 10% after the warm-up, or the run says it is not), what
the node logged at WARNING and above.

A second part (`--phases auth,tls`) measures what tenants' tokens and TLS cost on the
TCP data plane: 4 MiB puts and gets on nodes alike but for `--auth-file` or `--tls-cert`,
next to a raw TCP socket between two processes, in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench import ceilings
from kvstore.bench.measure import Run, Workload, median, source_bytes
from kvstore.bench.procs import Processes
from kvstore.bench.report import Row, add_ratios
from kvstore.client import Client
from kvstore.config import format_size
from kvstore.errors import CorruptBlock
from kvstore.keys import block_keys

HELP = "long mixed load with eviction churn and a disk tier; auth and TLS cost at 4 MiB"
PHASES = ("mix", "auth", "tls")
MIX = {"put": 0.3, "get": 0.4, "lookup": 0.2, "delete": 0.1}  # shares of operations
TOKENS = 16  # tokens per block: keys are chained over token ids, as an engine's are
WINDOW = 10.0  # seconds per bucket of the operations-over-time series
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
COMPARE_BLOCK, COMPARE_BATCH = 4 << 20, 16
TOKEN = "soak-token-0123456789abcdef"
REFUSALS = (": ResourceExhausted", ": Unavailable")  # errors that say "retry", counted apart
OPENSSL = (
    "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
    "-subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
)


@dataclass(frozen=True)
class Load:
    """What every client thread of the mix does; sent to the client processes."""

    address: str
    transports: tuple[str, ...]
    sizes: tuple[int, ...]
    blocks_per_prompt: int
    prompts: int
    skew: float
    seed: int
    duration: float


@dataclass
class Tally:
    """One thread's (then one run's) counts; latencies in seconds, per operation."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in MIX})
    errors: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    corrupt: int = 0
    asked_blocks: int = 0
    got_blocks: int = 0
    bytes_put: int = 0
    bytes_got: int = 0
    windows: Counter = field(default_factory=Counter)

    def merge(self, other: Tally) -> None:
        for op, values in other.latencies.items():
            self.latencies[op] += values
        self.errors.update(other.errors)
        self.first_errors += other.first_errors[: max(0, 10 - len(self.first_errors))]
        self.windows.update(other.windows)
        for name in ("corrupt", "asked_blocks", "got_blocks", "bytes_put", "bytes_got"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def payload(key: bytes, sizes: tuple[int, ...]) -> np.ndarray:
    """The one payload `key` ever carries: its size and every 8 bytes follow from the key
    and the position, so a block shifted, cut or swapped with another never matches."""
    words = np.arange(sizes[key[8] % len(sizes)] // 8, dtype=np.uint64)
    words *= GOLDEN
    words ^= np.uint64(int.from_bytes(key[:8], "little"))
    return words.view(np.uint8)


def prompt_keys(load: Load) -> list[list[bytes]]:
    """The chained keys of every prompt of the key space (prompts share no prefix)."""
    span = load.blocks_per_prompt * TOKENS
    salt = f"kvstore-bench/soak/{load.seed}".encode()
    return [
        block_keys(np.arange(p * span, (p + 1) * span), TOKENS, salt) for p in range(load.prompts)
    ]


class Picker:
    """Prompts drawn with a Zipf-like skew: a hot set that stays cached, a long cold tail
    that churns through both tiers. The same ranking in every process."""

    def __init__(self, load: Load, rng: np.random.Generator) -> None:
        ranks = np.arange(1, load.prompts + 1, dtype=np.float64)
        self.cdf = np.cumsum(ranks**-load.skew)
        self.order = np.random.default_rng(load.seed).permutation(load.prompts)
        self.rng = rng

    def prompt(self) -> int:
        at = np.searchsorted(self.cdf, self.rng.random() * self.cdf[-1])
        return int(self.order[min(at, len(self.order) - 1)])


def one_op(client: Client, op: str, keys: list[bytes], load: Load, tally: Tally) -> None:
    """One operation on one prompt, its answer checked; a wrong answer raises."""
    if op == "put":
        payloads = [payload(k, load.sizes) for k in keys]
        result = client.put(keys, payloads)
        if result.stored + result.existed != len(keys):
            raise AssertionError(f"put acknowledged {result} of {len(keys)} blocks")
        tally.bytes_put += sum(p.nbytes for p in payloads)
    elif op == "get":
        blocks = client.get(keys)
        tally.asked_blocks += len(keys)
        tally.got_blocks += len(blocks)
        for key, block in zip(keys, blocks, strict=False):
            got = np.asarray(block).view(np.uint8).reshape(-1)
            tally.bytes_got += got.nbytes
            if not np.array_equal(got, payload(key, load.sizes)):
                tally.corrupt += 1
    elif op == "lookup":
        found = client.lookup(keys)
        if not 0 <= found <= len(keys):
            raise AssertionError(f"lookup found {found} of {len(keys)} blocks")
    elif not 0 <= client.delete(keys) <= len(keys):
        raise AssertionError("delete removed more blocks than it named")


def client_thread(load: Load, n: int, keys: list[list[bytes]], start: float, tally: Tally) -> None:
    """Random operations on random prompts until the run's end; failures counted, and the
    client replaced after one (whatever state the failure left it in)."""
    rng = np.random.default_rng((load.seed, n))
    picker, ops, shares = Picker(load, rng), list(MIX), list(MIX.values())
    transport = load.transports[n % len(load.transports)]
    client = Client(load.address, transport=transport, timeout=60)
    try:
        while (now := time.monotonic()) < start + load.duration:
            op = ops[rng.choice(len(ops), p=shares)]
            try:
                one_op(client, op, keys[picker.prompt()], load, tally)
            except CorruptBlock:
                tally.corrupt += 1
            except Exception as exc:  # counted and shown: the soak's verdict is zero of these
                tally.errors[f"{op}/{transport}: {type(exc).__name__}"] += 1
                if len(tally.first_errors) < 10:
                    tally.first_errors.append(f"{op} over {transport}: {exc!r}")
                client.close()
                client = Client(load.address, transport=transport, timeout=60)
                continue
            done = time.monotonic()
            tally.latencies[op].append(done - now)
            tally.windows[int((done - start) // WINDOW)] += 1
    finally:
        client.close()


def client_process(load: Load, threads: list[int], barrier: Any, results: Any) -> None:
    """Some of the run's threads; their merged tally (or the failure) goes to the parent."""
    try:
        keys = prompt_keys(load)
        tallies = [Tally() for _ in threads]
        barrier.wait()
        start = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        workers = [
            threading.Thread(target=client_thread, args=(load, n, keys, start, t))
            for n, t in zip(threads, tallies, strict=True)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        total = Tally()
        for tally in tallies:
            total.merge(tally)
        results.put(total)
    except Exception:  # reported to the parent, which fails loudly
        results.put(traceback.format_exc())


def memory(pid: int) -> dict[str, int]:
    """Resident bytes of a process: in all, anonymous, file-backed, shared memory."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[fields[name]] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """The node's memory and CPU time every `every` seconds until stopped."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.start_time = pid, every, 0.0
        self.samples: list[dict[str, float]] = []
        self.stopped = threading.Event()

    def sample(self) -> None:
        now = round(time.monotonic() - self.start_time, 2)
        self.samples.append(
            {"t": now, "cpu_s": round(cpu_seconds(self.pid), 2), **memory(self.pid)}
        )

    def run(self) -> None:
        self.start_time = time.monotonic()  # the load's start: the barrier just opened
        self.sample()
        while not self.stopped.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.sample()


def start_node(procs: Processes, log: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    """A `kvstore-server` of the soak's own (its pid is watched), logging to `log`."""
    cmd = [sys.executable, "-m", "kvstore.server", "--address", "127.0.0.1:0", *flags]
    with log.open("w") as stderr:
        proc = procs.spawn(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout is not None  # piped
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.wait(timeout=30)
        raise RuntimeError(f"kvstore-server did not start: {line}{log.read_text()}")
    return line.split("listening on ", 1)[1].split()[0], proc


def stop_node(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(timeout=60)


def rss_summary(samples: list[dict[str, float]], warmup: float) -> dict[str, Any]:
    """Resident memory at the start, at the end of the warm-up, at the end; the largest
    growth past the warm-up figure seen after it."""
    after = [s for s in samples if s["t"] >= warmup] or samples[-1:]
    base = after[0]["rss"]
    growth = max(s["rss"] for s in after) / base - 1
    return {
        "rss_start": samples[0]["rss"],
        "rss_after_warmup": base,
        "rss_end": samples[-1]["rss"],
        "rss_max": max(s["rss"] for s in samples),
        "rss_growth_after_warmup": round(growth, 4),
        "rss_flat": growth <= 0.10,
        "warmup_s": warmup,
        "samples": samples,
    }


def mix(args: argparse.Namespace, procs: Processes, progress: Any, task: Any) -> list[Row]:
    """The mixed load: one node, `--processes` client processes, `--threads` in all."""
    scratch = args.dir or procs.tempdir()
    disk = Path(scratch) / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    log = Path(scratch) / "node.log"
    address, proc = start_node(
        procs, log, "--host-capacity", str(args.host_capacity), "--disk-dir", str(disk),
        "--disk-capacity", str(args.disk_capacity), "--log-level", "warning",
    )  # fmt: skip
    load = Load(
        address, tuple(args.transports), tuple(args.block_sizes), args.blocks_per_prompt,
        args.prompts, args.skew, args.seed, args.duration,
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.processes + 1), ctx.Queue()
    children = [
        ctx.Process(
            target=client_process,
            args=(load, list(range(i, args.threads, args.processes)), barrier, results),
            daemon=True,
        )
        for i in range(args.processes)
    ]
    for child in children:
        child.start()
    for child in children:
        procs.callback(child.kill)  # a no-op for one already gone
    sampler = Sampler(proc.pid, args.sample)
    barrier.wait(timeout=120)
    sampler.start()
    progress.update(task, description=f"mixed load for {args.duration:g}s")
    reports = [results.get(timeout=args.duration + 300) for _ in children]
    sampler.stop()
    for child in children:
        child.join(timeout=30)
    failed = [r for r in reports if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"a client process failed:\n{failed[0]}")
    total = Tally()
    for report in reports:
        total.merge(report)
    with Client(address, transport="grpc") as client:
        stats = client.stats()
    alive = proc.poll() is None
    exit_code = stop_node(proc) if alive else proc.returncode
    logged = [line for line in log.read_text().splitlines() if line.strip()]
    return mix_rows(args, total, stats, sampler.samples, logged, alive, exit_code)


def mix_rows(
    args: argparse.Namespace,
    total: Tally,
    stats: Any,
    samples: list[dict[str, float]],
    logged: list[str],
    alive: bool,
    exit_code: int,
) -> list[Row]:
    seconds = args.duration
    rows = []
    for op, values in total.latencies.items():
        run = Run(0, seconds, values)
        errors = sum(n for kind, n in total.errors.items() if kind.startswith(f"{op}/"))
        rows.append(
            Row.of(
                op, "mix", 0, run, ops=len(values), ops_per_s=round(len(values) / seconds, 1),
                p999_ms=round(run.percentile_ms(99.9), 3),
                max_ms=round(max(values, default=0) * 1e3, 3), errors=errors,
            )
        )  # fmt: skip
    tiers = {t.name: asdict(t) for t in stats.tiers}
    ops = sum(len(v) for v in total.latencies.values())
    summary = {
        "duration_s": seconds,
        "processes": args.processes,
        "threads": args.threads,
        "transports": args.transports,
        "ops": ops,
        "ops_per_s": round(ops / seconds, 1),
        "errors": sum(total.errors.values()),
        "errors_by_kind": dict(total.errors),
        "refused": sum(n for kind, n in total.errors.items() if kind.endswith(REFUSALS)),
        "first_errors": total.first_errors,
        "corrupt": total.corrupt,
        "get_hit_ratio": round(total.got_blocks / max(total.asked_blocks, 1), 4),
        "gb_put": round(total.bytes_put / 1e9, 3),
        "gb_got": round(total.bytes_got / 1e9, 3),
        "ops_per_window": [total.windows[w] for w in range(int(seconds // WINDOW) + 1)],
        "window_s": WINDOW,
        "node_alive_at_end": alive,
        "node_exit_code": exit_code,
        "node_logged": len(logged),
        "node_log_head": logged[:20],
        "tiers": tiers,
    }
    rows.append(Row("soak", "mix", 0, total.bytes_put + total.bytes_got, None, 0, 0, extra=summary))
    rss = rss_summary(samples, min(args.warmup, seconds / 4))
    rows.append(Row("rss", "node", 0, 0, None, 0, 0, extra=rss))
    return rows


@dataclass
class Variant:
    """One node of the comparison, its client, and what its rounds measured (or why not)."""

    name: str
    auth: bool
    tls: bool
    client: Client | None = None
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"put": [], "get": []})
    error: str = ""

    @property
    def path(self) -> str:
        return "+".join(["tcp", *(["auth"] if self.auth else []), *(["tls"] if self.tls else [])])

    def rows(self, block_size: int) -> list[Row]:
        extra = {"variant": self.name, "auth": self.auth, "tls": self.tls}
        if self.error:
            return [
                Row(op, self.path, block_size, 0, None, 0, 0, extra={**extra, "error": self.error})
                for op in self.runs
            ]
        return [
            Row.of(op, self.path, block_size, median(r), **extra) for op, r in self.runs.items()
        ]


def compare(args: argparse.Namespace, procs: Processes, progress: Any, task: Any) -> list[Row]:
    """4 MiB puts and gets over TCP on a plain node, one with tenants, one with TLS (and
    one with both when both are asked), and a raw socket: all up at once and measured in
    turn, round after round, so a busy machine slows every variant alike."""
    scratch = Path(args.dir or procs.tempdir())
    total = args.compare_total // COMPARE_BLOCK * COMPARE_BLOCK
    work = Workload(COMPARE_BLOCK, total, COMPARE_BATCH)
    source = source_bytes(total, args.seed)
    variants = [Variant("plain", False, False)]
    variants += [Variant("auth", True, False)] if "auth" in args.phases else []
    variants += [Variant("tls", False, True)] if "tls" in args.phases else []
    if "auth" in args.phases and "tls" in args.phases:
        variants.append(Variant("auth+tls", True, True))
    for variant in variants:
        open_variant(procs, scratch, variant, work.total)
    port = ceilings.start_server(procs, "tcp")
    raw: dict[str, list[Run]] = {"put": [], "get": []}
    for rep in range(args.repeat + 1):  # the first round: a warm-up, timed by no one
        progress.update(task, description=f"4 MiB over TCP: round {rep} of {args.repeat}")
        for variant in variants[rep % len(variants) :] + variants[: rep % len(variants)]:
            if variant.error:
                continue
            assert variant.client is not None  # opened, or it has its error
            try:
                runs = timed_round(variant.client, work, source, f"{variant.name}/{rep}")
            except Exception as exc:  # the interface may not be there yet: say so, go on
                variant.error = f"{type(exc).__name__}: {exc}"
                continue
            for op, run in zip(("put", "get"), runs, strict=True):
                variant.runs[op] += [run] if rep else []
        for op in raw:
            raw[op] += [ceilings.raw_tcp(port, work, source, op)] if rep else []
    rows = [row for variant in variants for row in variant.rows(COMPARE_BLOCK)]
    rows += [Row.of(op, "raw_tcp", COMPARE_BLOCK, median(runs)) for op, runs in raw.items()]
    for variant in variants:
        if variant.client is not None:
            variant.client.close()
    add_ratios(rows)
    plain = {r.scenario: r.gbps for r in rows if r.extra.get("variant") == "plain"}
    for row in rows:
        base = plain.get(row.scenario)
        if row.gbps and base and row.extra.get("variant") not in (None, "plain"):
            row.ratios["plain"] = round(row.gbps / base, 3)
    return rows


def open_variant(procs: Processes, scratch: Path, variant: Variant, total: int) -> None:
    """Start the variant's node and connect its client; a failure is kept as its error."""
    flags = ["--host-capacity", str(total + (256 << 20)), "--log-level", "warning"]
    token: str | None = None
    tls_ca = ""
    if variant.auth:
        tenants = scratch / "tenants.toml"
        quota = format_size(4 * total)
        tenants.write_text(
            f'secret = "{os.urandom(24).hex()}"\n'
            f'[[tenant]]\nname = "soak"\ntoken = "{TOKEN}"\nquota = "{quota}"\n'
        )
        flags += ["--auth-file", str(tenants)]
        token = TOKEN
    if variant.tls:
        cert, key = certificate(scratch)
        flags += ["--tls-cert", str(cert), "--tls-key", str(key)]
        tls_ca = str(cert)
    try:
        address, _ = start_node(procs, scratch / f"node-{variant.name}.log", *flags)
        variant.client = Client(address, transport="tcp", timeout=120, token=token, tls_ca=tls_ca)
    except Exception as exc:
        variant.error = f"{type(exc).__name__}: {exc}"


def timed_round(client: Client, work: Workload, source: np.ndarray, tag: str) -> tuple[Run, ...]:
    """Every batch put, then every batch got into one reused buffer and compared with the
    source outside the timing; the keys deleted after."""
    size = work.block_size
    keys = block_keys(np.arange(work.blocks), 1, f"kvstore-bench/soak/compare/{tag}".encode())
    out = np.empty(work.batch * size, np.uint8)
    times: dict[str, list[float]] = {"put": [], "get": []}
    for batch in work.batches():
        blocks = [source[i * size : (i + 1) * size] for i in batch]
        t = time.perf_counter()
        client.put([keys[i] for i in batch], blocks)
        times["put"].append(time.perf_counter() - t)
    for batch in work.batches():
        t = time.perf_counter()
        got = client.get([keys[i] for i in batch], out=out)
        times["get"].append(time.perf_counter() - t)
        n = len(batch) * size
        if len(got) != len(batch) or not np.array_equal(out[:n], source[batch[0] * size :][:n]):
            raise AssertionError(f"batch at block {batch[0]} came back different")
    client.delete(keys)
    return tuple(Run(work.total, sum(times[op]), times[op]) for op in ("put", "get"))


def certificate(scratch: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it as its CA)."""
    cert, key = scratch / "node-cert.pem", scratch / "node-key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", *OPENSSL.split(), "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
    return cert, key


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--phases", type=choices(PHASES), default=list(PHASES))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of mixed load")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=32, help="client threads in all")
    parser.add_argument(
        "--transports", type=choices(("tcp", "grpc", "shm")), default=["tcp", "grpc", "shm"],
        help="thread n uses the n-th, round robin",
    )  # fmt: skip
    parser.add_argument("--block-sizes", type=sizes, default=[64 << 10, 256 << 10, 1 << 20])
    parser.add_argument("--blocks-per-prompt", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4000, help="prompts in the key space")
    parser.add_argument("--skew", type=float, default=0.9, help="Zipf exponent of prompt picks")

    def size(text: str) -> int:
        return sizes(text)[0]

    parser.add_argument("--host-capacity", type=size, default=256 << 20)
    parser.add_argument("--disk-capacity", type=size, default=1 << 30)
    parser.add_argument("--dir", type=Path, help="where the disk tier goes (default: a temp dir)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds (at most 1/4 of it)")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument(
        "--compare-total", type=size, default=1 << 30, help="bytes per auth/TLS measurement"
    )


def check(args: argparse.Namespace) -> str:
    if args.duration <= 0 or args.sample <= 0 or args.warmup < 0:
        return "--duration and --sample must be positive, --warmup not negative"
    if not 1 <= args.processes <= args.threads:
        return "--processes must be at least 1 and at most --threads"
    if args.blocks_per_prompt < 1 or args.prompts < 1:
        return "--blocks-per-prompt and --prompts must be at least 1"
    if any(size % 8 for size in args.block_sizes):
        return "--block-sizes must be multiples of 8 bytes"
    if args.compare_total < COMPARE_BLOCK * COMPARE_BATCH:
        return f"--compare-total must hold one batch ({format_size(COMPARE_BLOCK * COMPARE_BATCH)})"
    return ""


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    """The soak starts nodes of its own (it watches their memory): `--address` is unused."""
    progress.update(task, total=None)
    rows = mix(args, procs, progress, task) if "mix" in args.phases else []
    if {"auth", "tls"} & set(args.phases):
        rows += compare(args, procs, progress, task)
    return rows
