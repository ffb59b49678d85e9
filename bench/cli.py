"""kvstore-bench: transfer throughput and lookup rates, next to ceilings and peers
measured in the same run on the same bytes.

    kvstore-bench [transfer] [--quick] [--json FILE] [--plot FILE.png] ...
    kvstore-bench transfer --paths nixl,nixl_staged,tcp [--ucx-tls tcp] [--crossover] [--idle 10]
    kvstore-bench lookup [--prompt-tokens 1024,131072] ...
    kvstore-bench ops [--paths shm,tcp,grpc] [--calls 2000] ...
    kvstore-bench tiers [--dir DIR] [--host-capacity 1GiB] ...
    kvstore-bench crash [--loops 10] [--json FILE] ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvstore import codecs, fabric
from kvstore.bench import (
    ceilings,
    cluster_bench,
    codec_bench,
    crash_bench,
    lmcache_bench,
    nixl_gpu,
    nixl_rows,
    ops_bench,
    sglang_bench,
    soak_bench,
    tier_bench,
    trace,
    ttft,
    vllm_bench,
    vllm_gpu,
    workloads,
)
from kvstore.bench.measure import Run, Workload, median, source_bytes
from kvstore.bench.procs import Processes
from kvstore.bench.report import CEILINGS, Row, add_ratios, plot, table, write_json
from kvstore.bench.workloads import Verifier, bench_keys, get_buffers
from kvstore.client import Client
from kvstore.config import format_size, parse_size
from kvstore.keys import block_keys

SCENARIOS = ("put", "get", "handoff", "push")
# Subcommands in modules of their own: HELP, add_arguments(parser, choices, ints, sizes),
# check(args) -> problem or "", run(args, procs, address, progress, task) -> rows.
PLUGINS = {
    "cluster": cluster_bench,
    "crash": crash_bench,
    "lmcache": lmcache_bench,
    "nixl-gpu": nixl_gpu,
    "ops": ops_bench,
    "sglang": sglang_bench,
    "soak": soak_bench,
    "trace": trace,
    "vllm": vllm_bench,
    "vllm-gpu": vllm_gpu,
}
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
PATHS = ("shm", "lease", "tcp", "grpc")
NIXL_PATHS = ("nixl", "nixl_staged")  # from registered memory, and through staging
QUICK = {
    "block_sizes": [256 << 10, 4 << 20],
    "total": 256 << 20,
    "repeat": 1,
    "scenarios": ["put", "get"],
    "paths": list(PATHS),
}
VERIFY_STRIDE = {"all": 1, "sample": 16, "off": 0}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return sizes


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}"
            )
        return chosen

    return parse


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="benchmark this running daemon instead of starting one")
    common.add_argument("--seed", type=int, default=0, help="seed of the payload bytes and tokens")
    common.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    common.add_argument(
        "--repeat", type=int, default=3, help="runs of each measurement; the median is reported"
    )

    ap = argparse.ArgumentParser(
        prog="kvstore-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command")
    t = sub.add_parser("transfer", parents=[common], help="put/get/handoff throughput (default)")
    t.add_argument(
        "--quick",
        action="store_true",
        help="256KiB and 4MiB blocks, put and get, 256MiB each, one run: under a minute",
    )
    t.add_argument("--scenarios", type=_choices(SCENARIOS), default=["put", "get", "handoff"])
    t.add_argument(
        "--paths",
        type=_choices(PATHS + NIXL_PATHS),
        default=list(PATHS),
        help="transfer paths (nixl: puts from and gets into registered memory; nixl_staged: "
        "unregistered memory, one copy)",
    )
    t.add_argument("--block-sizes", type=_sizes, default=_sizes("64KiB,256KiB,1MiB,4MiB"))
    t.add_argument("--total", type=parse_size, default=1 << 30, help="bytes per measurement")
    t.add_argument(
        "--batch",
        type=_ints,
        default=[0],
        help="blocks per request, comma-separated sweep; 0: 64MiB worth",
    )
    t.add_argument(
        "--streams", type=_ints, default=[1], help="concurrent client streams per process (sweep)"
    )
    t.add_argument(
        "--procs",
        type=_ints,
        default=[1],
        help="client processes sharing a put/get workload (sweep)",
    )
    t.add_argument("--chunk", type=parse_size, default=1 << 20, help="data frame size of puts")
    t.add_argument(
        "--ceilings",
        type=_choices(CEILINGS),
        help="default: all but raw_nixl, which is added when a nixl path is measured",
    )
    t.add_argument(
        "--ucx-tls",
        help="UCX_TLS for every process the benchmark starts (tcp: UCX over TCP only); "
        "default: the environment's, else UCX's own choice (CMA on one host)",
    )
    t.add_argument(
        "--crossover",
        type=_sizes,
        nargs="?",
        const=nixl_rows.CROSSOVER_SIZES,
        help="one-block put and get latency over nixl and tcp, with small blocks on the "
        "socket, through NIXL, and as shipped (default sizes 4KiB..1MiB)",
    )
    t.add_argument(
        "--idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="CPU used by an idle node and client with a NIXL session open, over SECONDS",
    )
    t.add_argument(
        "--redis-url",
        help="a running Redis to compare with (default: start one if redis-server is on PATH)",
    )
    t.add_argument("--no-redis", action="store_true", help="skip the Redis peer")
    t.add_argument(
        "--verify",
        choices=tuple(VERIFY_STRIDE),
        default="sample",
        help="check received bytes: every block, every 16th, or none",
    )
    t.add_argument("--plot", type=Path, metavar="FILE.png", help="throughput vs block size")
    cd = sub.add_parser("codecs", parents=[common], help="codecs on real KV, and over slow links")
    cd.add_argument("--codecs", type=_choices(sorted(codecs.CODECS)), default=sorted(codecs.CODECS))
    cd.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        help="where the real KV samples (smollm2_kv_*_512tok.npy) are",
    )
    cd.add_argument(
        "--links",
        type=_floats,
        default=[1.0, 10.0, 0.0],
        help="link speeds in Gbit/s for the end-to-end rows; 0: unlimited",
    )
    cd.add_argument(
        "--link-codecs",
        type=_choices(["auto", *sorted(codecs.CODECS)]),
        default=["auto", "shuffle-zstd", "split", "split-zstd", "int8+zstd", "int4+zstd"],
        help="codecs for the end-to-end rows; auto picks per link (lossless)",
    )
    cd.add_argument("--copies", type=int, default=8, help="copies of the sample per transfer")
    tt = sub.add_parser(
        "ttft",
        parents=[common],
        help="disaggregated prefill/decode with SmolLM2: time to first token",
    )
    tt.add_argument("--prompt-tokens", type=_ints, default=[2048])
    tt.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="tokens per block (an engine's page; the partial last block is recomputed)",
    )
    tt.add_argument("--codec", choices=sorted(codecs.NAMES - {""}), default="none")
    tt.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    tt.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared")
    tr = sub.add_parser("tiers", parents=[common], help="disk tier and demotion throughput")
    tr.add_argument("--dir", type=Path, default=Path("."), help="where the disk files go")
    tr.add_argument("--block-size", type=parse_size, default=4 << 20)
    tr.add_argument("--total", type=parse_size, default=1 << 30, help="bytes per disk measurement")
    tr.add_argument(
        "--host-capacity",
        type=parse_size,
        default=1 << 30,
        help="host tier of the demotion daemon; 2.5 times this is put",
    )
    tr.add_argument("--transports", type=_choices(("shm", "tcp", "grpc")), default=["shm", "tcp"])
    for name, module in PLUGINS.items():
        module.add_arguments(
            sub.add_parser(name, parents=[common], help=module.HELP), _choices, _ints, _sizes
        )
    lk = sub.add_parser("lookup", parents=[common], help="prefix lookups per second")
    lk.add_argument("--prompt-tokens", type=_ints, default=[1024, 4096, 16384, 65536, 131072])
    lk.add_argument("--block-size", type=int, default=16, help="tokens per block")
    lk.add_argument("--seconds", type=float, default=1.0, help="time spent on each prompt length")
    return ap


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = parser()
    argv = list(argv)
    commands = ("transfer", "lookup", "codecs", "ttft", "tiers", *PLUGINS, "-h", "--help")
    if not argv or argv[0] not in commands:
        argv.insert(0, "transfer")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.command == "transfer":
        if args.quick:
            for name, value in QUICK.items():
                setattr(args, name, value)
        if args.total < max(args.block_sizes):
            ap.error(f"--total {format_size(args.total)} is smaller than a block")
        if min(args.batch) < 0 or min(args.streams) < 1 or min(args.procs) < 1:
            ap.error("--batch must be >= 0, --streams and --procs >= 1")
        if not 4096 <= args.chunk <= 64 << 20:
            ap.error("--chunk must be 4KiB..64MiB")
        if args.ucx_tls == "" or args.idle < 0:
            ap.error("--ucx-tls must name transports (omit it for UCX's own choice); --idle >= 0")
        if args.ucx_tls:  # before UCX starts here; every process started later inherits it
            os.environ["UCX_TLS"] = args.ucx_tls
        args.ucx = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}  # for the JSON
        nixl_paths = bool(set(args.paths) & set(NIXL_PATHS))
        if args.ceilings is None:
            args.ceilings = [c for c in CEILINGS if c != "raw_nixl" or nixl_paths]
        wants_nixl = nixl_paths or args.crossover or args.idle or "raw_nixl" in args.ceilings
        if wants_nixl and (why := fabric.why_not()):
            ap.error(why)
    elif args.command == "ttft":
        if args.block_size < 1 or min(args.prompt_tokens) < 2 or args.new_tokens < 1:
            ap.error("--block-size, --new-tokens >= 1 and --prompt-tokens >= 2")
    elif args.command == "codecs":
        if not (args.data_dir / "smollm2_kv_fp16_512tok.npy").exists():
            ap.error(f"--data-dir {args.data_dir} holds no smollm2_kv_*_512tok.npy samples")
        if args.copies < 1 or min(args.links) < 0:
            ap.error("--copies must be >= 1 and --links >= 0")
    elif args.command == "tiers":
        if args.total < args.block_size or args.host_capacity < 4 * args.block_size:
            ap.error("--total must hold a block and --host-capacity at least four")
    elif args.command in PLUGINS:
        if problem := PLUGINS[args.command].check(args):
            ap.error(problem)
    elif min(args.prompt_tokens) < args.block_size or args.block_size < 1:
        ap.error("--prompt-tokens must each hold at least one --block-size block")
    return args


def warmup(work: Workload) -> Workload:
    """A shorter run of the same shape, timed by no one: connections, code paths and
    memory are warm when the measured runs start."""
    return replace(
        work,
        total=max(work.block_size, min(work.total, 32 << 20)) // work.block_size * work.block_size,
    )


class Transfer:
    """One `transfer` run: every selected measurement, kvstore first, then ceilings and peers."""

    def __init__(
        self,
        args: argparse.Namespace,
        procs: Processes,
        address: str,
        redis_url: str | None,
        advance: Callable[[str], None],
    ) -> None:
        self.args, self.procs, self.address, self.redis_url = args, procs, address, redis_url
        self.advance = advance
        self.source = source_bytes(args.total, args.seed)
        self.ports: dict[str, int] = {}
        self._clients: dict[tuple[str, int], list[Client]] = {}
        self._buffers: dict[tuple[str, int], list[np.ndarray]] = {}
        self._nodes: dict[str, str] = {}
        self.rows: list[Row] = []

    def steps(self) -> int:
        a = self.args
        per_size = (
            len(a.paths)
            * len(a.batch)
            * len(a.streams)
            * (len(a.scenarios) + 2 * sum(p > 1 for p in a.procs))
            + 2 * len(a.ceilings)
            + (4 if self.redis_url else 0)
        )
        return per_size * len(a.block_sizes) + (1 if a.crossover else 0) + (1 if a.idle else 0)

    def run(self) -> list[Row]:
        for size in self.args.block_sizes:
            for path in self.args.paths:
                for batch in self.args.batch:
                    for streams in self.args.streams:
                        self.kvstore(path, self.workload(size, batch), streams)
                        for procs in (p for p in self.args.procs if p > 1):
                            self.kvstore_procs(path, self.workload(size, batch), streams, procs)
            work = self.workload(size, self.args.batch[0])
            self.ceilings(work)
            if self.redis_url:
                self.redis(work, self.redis_url)
        if self.args.crossover:
            self.rows += nixl_rows.crossover(self.procs, self.args.crossover, self.args.repeat)
            self.advance("small blocks: nixl against tcp")
        if self.args.idle:
            self.rows += nixl_rows.idle(self.procs, self.args.idle)
            self.advance("idle CPU with NIXL loaded")
        add_ratios(self.rows)
        return self.rows

    def workload(self, size: int, batch: int) -> Workload:
        return Workload(
            size,
            self.args.total // size * size,
            batch or max(1, (64 << 20) // size),
            self.args.chunk,
        )

    def second_node(self) -> str:
        """A decode node for the push scenario, started on first use."""
        if "node" not in self._nodes:
            capacity = str(self.args.total + (256 << 20))
            self._nodes["node"] = self.procs.daemon("--host-capacity", capacity)
        return self._nodes["node"]

    def clients(self, path: str, streams: int) -> list[Client]:
        if (path, streams) not in self._clients:
            made = workloads.clients(self.address, path, streams, self.args.chunk, self.source)
            self._clients[path, streams] = made
            batches = [self.workload(s, b) for s in self.args.block_sizes for b in self.args.batch]
            largest = max(work.batch * work.block_size for work in batches)
            self._buffers[path, streams] = get_buffers(made, path, largest)
        return self._clients[path, streams]

    def close(self) -> None:
        for clients in self._clients.values():
            for client in clients:
                client.close()

    def verifier(self, work: Workload) -> Verifier:
        return Verifier(self.source, work.block_size, VERIFY_STRIDE[self.args.verify])

    def kvstore(self, path: str, work: Workload, streams: int) -> None:
        runs: dict[str, list[Run]] = {s: [] for s in self.args.scenarios}
        warm = warmup(work)
        keys = bench_keys(warm, f"warmup/{path}/{work}/{streams}")
        clients = self.clients(path, streams)
        buffers = self._buffers[path, streams]
        workloads.kvstore_put(clients, warm, self.source, keys)
        workloads.kvstore_get(clients, path, warm, keys, self.verifier(warm), buffers)
        self.delete(keys)
        for rep in range(self.args.repeat):
            keys = bench_keys(work, f"{path}/{work}/{streams}/{rep}/{self.args.seed}")
            put = workloads.kvstore_put(clients, work, self.source, keys)
            runs.setdefault("put", []).append(put)
            # get (timed) or, for put alone, an untimed check of what was stored
            get = workloads.kvstore_get(clients, path, work, keys, self.verifier(work), buffers)
            runs.setdefault("get", []).append(get)
            self.delete(keys)
            if "push" in runs:
                keys = bench_keys(work, f"push/{path}/{work}/{rep}/{self.args.seed}")
                runs["push"].append(
                    workloads.push(
                        clients,
                        path,
                        self.second_node(),
                        work,
                        self.source,
                        keys,
                        self.verifier(work),
                    )
                )
                self.delete(keys)
            if "handoff" in runs:
                keys = bench_keys(work, f"handoff/{path}/{work}/{rep}/{self.args.seed}")
                runs["handoff"].append(
                    workloads.handoff(
                        self.address, path, work, self.source, keys, self.verifier(work)
                    )
                )
                self.delete(keys)
        for scenario in self.args.scenarios:
            run = median(runs[scenario])
            extra = {
                "batch": work.batch,
                "streams": streams,
                "procs": 1,
                "tier": "host",
                "codec": "none",
            }
            if scenario == "handoff":
                extra["handoff_s"] = round(run.seconds, 4)
            self.rows.append(Row.of(scenario, path, work.block_size, run, **extra))
            self.advance(f"kvstore {path} {scenario} {format_size(work.block_size)}")

    def kvstore_procs(self, path: str, work: Workload, streams: int, procs: int) -> None:
        """Put and get with the workload shared by `procs` client processes."""
        runs: dict[str, list[Run]] = {"put": [], "get": []}
        stride = VERIFY_STRIDE[self.args.verify]
        for rep in range(self.args.repeat + 1):  # the first one warms up, untimed
            keys = bench_keys(work, f"procs/{path}/{work}/{streams}/{procs}/{rep}")
            put, get = workloads.in_processes(
                self.address, path, work, keys, self.args.seed, procs, streams, stride
            )
            self.delete(keys)
            if rep:
                runs["put"].append(put)
                runs["get"].append(get)
        for scenario in ("put", "get"):
            extra = {
                "batch": work.batch,
                "streams": streams,
                "procs": procs,
                "tier": "host",
                "codec": "none",
            }
            self.rows.append(
                Row.of(scenario, path, work.block_size, median(runs[scenario]), **extra)
            )
            self.advance(f"kvstore {path} {scenario} x{procs} processes")

    def ceilings(self, work: Workload) -> None:
        a = self.args
        for name in a.ceilings:
            for direction in ("put", "get"):
                self.ceiling(name, warmup(work), direction)
                run = median([self.ceiling(name, work, direction) for _ in range(a.repeat)])
                self.rows.append(Row.of(direction, name, work.block_size, run, batch=work.batch))
                self.advance(f"{name} {direction} {format_size(work.block_size)}")

    def ceiling(self, name: str, work: Workload, direction: str) -> Run:
        if name == "memcpy":
            return ceilings.memcpy(work, self.source)
        if name == "file_io":
            return ceilings.file_io(self.procs.tempdir(), work, self.source, direction)
        kind = {"raw_tcp": "tcp", "raw_nixl": "nixl"}.get(name, "grpc")
        if kind not in self.ports:
            self.ports[kind] = ceilings.start_server(self.procs, kind)
        if name == "raw_tcp":
            return ceilings.raw_tcp(self.ports[kind], work, self.source, direction)
        if name == "raw_nixl":
            return ceilings.raw_nixl(self.ports[kind], work, self.source, direction)
        return ceilings.grpc_bare(self.ports[kind], work, direction)

    def redis(self, work: Workload, url: str) -> None:
        for pipelined in (False, True):
            path = "redis_pipelined" if pipelined else "redis"
            puts, gets = [], []
            warm = warmup(work)
            keys = bench_keys(warm, "redis/warmup")
            workloads.redis_put(url, warm, self.source, keys, pipelined)
            workloads.redis_get(url, warm, keys, pipelined, self.verifier(warm))
            for rep in range(self.args.repeat):
                keys = bench_keys(work, f"redis/{rep}")
                puts.append(workloads.redis_put(url, work, self.source, keys, pipelined))
                gets.append(workloads.redis_get(url, work, keys, pipelined, self.verifier(work)))
            for scenario, runs in (("put", puts), ("get", gets)):
                self.rows.append(
                    Row.of(scenario, path, work.block_size, median(runs), batch=work.batch)
                )
                self.advance(f"{path} {scenario} {format_size(work.block_size)}")

    def delete(self, keys: list[bytes]) -> None:
        with Client(self.address) as client:
            for start in range(0, len(keys), 8192):
                client.delete(keys[start : start + 8192])


def run_lookup(args: argparse.Namespace, address: str, advance: Callable[[str], None]) -> list[Row]:
    tokens = np.random.default_rng(args.seed).integers(0, 50_000, max(args.prompt_tokens))
    salt = f"kvstore-bench/lookup/{args.seed}".encode()
    keys = block_keys(tokens, args.block_size, salt)
    with Client(address) as client:
        for start in range(0, len(keys), 8192):
            part = keys[start : start + 8192]
            client.put(part, [b"\0"] * len(part))
    rows = []
    for n in args.prompt_tokens:
        for server_side in (False, True):
            run = median(
                [
                    workloads.lookup(
                        address,
                        tokens[:n],
                        args.block_size,
                        salt,
                        server_side,
                        args.seconds / args.repeat,
                    )
                    for _ in range(args.repeat)
                ]
            )
            path = "grpc-tokens" if server_side else "grpc"
            rows.append(
                Row.of(
                    "lookup",
                    path,
                    args.block_size,
                    run,
                    prompt_tokens=n,
                    blocks=n // args.block_size,
                    ops_per_s=round(len(run.latencies) / run.seconds, 1),
                )
            )
            advance(f"lookup {n} tokens ({path})")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    args = parse(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    try:
        with Processes() as procs, Progress(console=console, transient=True) as progress:
            address = args.address
            if address is None and args.command not in ("tiers", "crash"):  # own nodes
                capacity = (args.total * 2 if args.command == "transfer" else 1 << 30) + (256 << 20)
                address = procs.daemon("--host-capacity", str(capacity))
            redis_url, redis_version = None, None
            if args.command == "transfer" and not args.no_redis:
                redis_url = args.redis_url or procs.redis()
                redis_version = _redis_version() if redis_url else None
            task = progress.add_task("starting", total=None)

            def advance(what: str) -> None:
                progress.update(task, advance=1, description=what)

            if args.command == "ttft":
                progress.update(task, total=len(args.prompt_tokens))
                rows = []
                for n in args.prompt_tokens:
                    result = ttft.run(
                        address, n, args.block_size, args.codec, args.device, args.new_tokens
                    )
                    rows.append(
                        Row(
                            "ttft",
                            "auto",
                            args.block_size,
                            0,
                            None,
                            result["ttft_cached_s"] * 1e3,
                            result["ttft_cached_s"] * 1e3,
                            extra=result,
                        )
                    )
                    advance(f"ttft {n} tokens")
            elif args.command == "codecs":
                blocks = codec_bench.load_blocks(args.data_dir)
                progress.update(task, total=2)
                rows = codec_bench.codec_rows(blocks, args.codecs, args.repeat)
                advance("codecs on the real sample")
                rows += codec_bench.link_rows(
                    address,
                    blocks["bfloat16"],
                    args.link_codecs,
                    args.links,
                    args.copies,
                    args.repeat,
                )
                advance("codecs over links")
            elif args.command == "tiers":
                progress.update(task, total=2)
                work = Workload(args.block_size, args.total, max(1, (64 << 20) // args.block_size))
                with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
                    rows = tier_bench.disk_rows(Path(scratch), work, args.seed, args.repeat)
                    advance("disk tier")
                    for transport in args.transports:
                        rows += tier_bench.demotion_rows(
                            procs, Path(scratch), args.host_capacity, args.block_size,
                            transport, args.seed,
                        )  # fmt: skip
                    advance("demotion")
                add_ratios(rows)
            elif args.command in PLUGINS:
                rows = PLUGINS[args.command].run(args, procs, address, progress, task)
            elif args.command == "transfer":
                transfer = Transfer(args, procs, address, redis_url, advance)
                procs.callback(transfer.close)
                progress.update(task, total=transfer.steps())
                rows = transfer.run()
            else:
                progress.update(task, total=2 * len(args.prompt_tokens))
                rows = run_lookup(args, address, advance)
    except KeyboardInterrupt:
        console.print("interrupted: every process the benchmark started has been stopped")
        return 130
    out = Console()
    if not out.is_terminal:
        out = Console(width=140)
    out.print(table(rows, f"kvstore-bench {args.command}"))
    if args.json:
        write_json(args.json, params, rows, redis_version)
    if getattr(args, "plot", None):
        plot(args.plot, rows)
    return 0


def _redis_version() -> str | None:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), None)


if __name__ == "__main__":
    sys.exit(main())
