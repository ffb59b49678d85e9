"""kvstore-bench trace TRACE.jsonl: replay a request trace through a real cluster.

N daemons started with --cluster on a Redis started here (or the nodes of `--redis`),
requests routed by the product's `kvstore.router.Router` in trace order, every hit read
back and checked byte for byte; beside it, the offline references computed from the
trace alone (unbounded, one LRU cache, Belady's MIN at the same capacity) and the same
routing choice on a model of the cluster (exact index, exact LRU nodes).

Also `python -m kvstore.bench.trace TRACE.jsonl [...]`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench import trace_cluster, trace_metrics, trace_report, trace_sim
from kvstore.bench.procs import Processes, cluster_secret
from kvstore.bench.report import Row
from kvstore.bench.trace_format import (
    TOKENS_PER_BLOCK,
    Request,
    TraceError,
    load_trace,
    share_of,
    with_shared_prefix,
)
from kvstore.bench.trace_refs import Hits, belady, lru, unbounded
from kvstore.bench.trace_replay import (
    KILL,
    REDIS_RESTART,
    REDIS_STALL,
    BlockBytes,
    Fault,
    Outcome,
    Replay,
)
from kvstore.client import Client
from kvstore.cluster.scoring import POLICIES
from kvstore.config import parse_size
from kvstore.router import Router

HELP = "replay a request trace (Mooncake's format) through N daemons and the product's Router"
DEFAULT_SHARE = 0.25
RECOVERY_WINDOW, RECOVERY_SHARE = 200, 0.8


def _shares(text: str) -> list[float]:
    try:
        shares = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shares such as 0.05,0.25: {text!r}") from None
    if not shares or not all(0 < s <= 1 for s in shares):
        raise argparse.ArgumentTypeError(f"shares must be in (0, 1]: {text!r}")
    return shares


def _faults(text: str) -> list[Fault]:
    """`kill@500,redis-restart@1000,redis-stall@1500:3`, in request order."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, rest = part.partition("@")
        at, _, seconds = rest.partition(":")
        try:
            fault = Fault(kind, int(at), float(seconds or 0))
        except ValueError:
            fault = None
        if (
            fault is None
            or kind not in (KILL, REDIS_RESTART, REDIS_STALL)
            or fault.at < 1
            or (kind == REDIS_STALL) != (fault.seconds > 0)
        ):
            raise argparse.ArgumentTypeError(
                f"expected kill@N, redis-restart@N or redis-stall@N:SECONDS (N >= 1): {part!r}"
            )
        faults.append(fault)
    if len({f.at for f in faults}) < len(faults):
        raise argparse.ArgumentTypeError(f"one fault a request: {text!r}")
    return sorted(faults, key=lambda f: f.at)


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    a = parser.add_argument
    a("trace", type=Path, help="JSONL: timestamp, input_length, output_length, hash_ids")
    a("--nodes", type=int, default=4, help="daemons the bench starts")
    a(
        "--capacity-blocks",
        type=int,
        help="host blocks over all nodes (default: 25%% of the "
        "trace's distinct blocks); floor(C/N) a node, the first C mod N one more",
    )
    a("--disk-capacity-blocks", type=int, default=0, help="a disk tier of D blocks in all")
    a("--block-bytes", type=parse_size, default=16 << 10, help="payload bytes of a block")
    a("--tokens-per-block", type=int, default=TOKENS_PER_BLOCK)
    a("--router", type=choices(POLICIES), default=["cost"], help="cost, prefix, random (a list)")
    a("--fetch-through", action="store_true", help="nodes pull prefixes held elsewhere")
    a("--limit", type=int, help="replay the first K requests")
    a("--speed", type=float, help="follow the timestamps X times faster (default: flat out)")
    a(
        "--kv-bytes-per-token",
        type=int,
        default=trace_report.KV_BYTES_PER_TOKEN,
        help=f"to give capacities in GiB of real KV (default: {trace_report.KV_MODEL})",
    )
    a("--plot", dest="trace_plot", type=Path, metavar="FILE.png", help="hit ratio vs capacity")
    a("--redis", help="run against the nodes registered in this Redis (already up)")
    a("--sweep", type=_shares, help="capacities as shares of the distinct blocks, in turn")
    a("--nodes-sweep", type=ints, help="node counts, in turn")
    a("--shared-prefix", action="store_true", help="one block prepended to every request")
    a("--kill-at", type=int, help="SIGKILL a node at this request (and replay without, too)")
    a("--dirty-ratio", type=float, help="the daemons' --dirty-ratio (with a disk tier)")
    a(
        "--chaos",
        type=_faults,
        metavar="FAULTS",
        help="faults at given requests, e.g. kill@500,redis-restart@1000,redis-stall@1500:3 "
        "(a killed node starts again, empty); compared with the model of the same faults",
    )
    a("--deadline", type=float, default=5.0, help="seconds a request may take (default 5)")


def check(args: argparse.Namespace) -> str:
    try:
        requests = _requests(args)
    except (OSError, TraceError) as exc:
        return f"{args.trace}: {exc}"
    if not requests:
        return f"{args.trace}: no requests"
    if args.redis:
        given = [
            name
            for name in ("capacity_blocks", "sweep", "nodes_sweep", "kill_at", "chaos")
            if getattr(args, name)
        ]
        if given or args.disk_capacity_blocks or args.nodes != 4:
            return "--redis replays through the nodes already up: no capacity, node or fault flags"
    if args.fetch_through and "fetch" not in inspect.signature(Client.get).parameters:
        return "--fetch-through is not yet possible: this client's get cannot fetch"
    if args.capacity_blocks is not None and args.sweep:
        return "--capacity-blocks and --sweep are exclusive"
    if min([args.nodes, *(args.nodes_sweep or [])]) < 1 or args.block_bytes < 1:
        return "--nodes and --block-bytes must be at least 1"
    if args.kill_at is not None and not 0 < args.kill_at < len(requests):
        return f"--kill-at must be within the {len(requests)} requests replayed"
    if args.chaos:
        if args.kill_at is not None or args.disk_capacity_blocks:
            return "--chaos takes no --kill-at or disk tier (the model has no disk)"
        if args.chaos[-1].at >= len(requests):
            return f"--chaos faults must be within the {len(requests)} requests replayed"
    if args.speed is not None and args.speed <= 0:
        return "--speed must be > 0"
    if args.deadline <= 0:
        return "--deadline must be > 0"
    if args.redis:  # the nodes are sized already: `run` reads their shape from the registry
        return ""
    for nodes, capacity in _configs(args, requests):
        least = capacity // nodes
        if least < 1 or trace_cluster.host_bytes(least, args.block_bytes) < trace_cluster.MIN_HOST:
            return (
                f"{capacity} blocks over {nodes} nodes is {least} a node, under the daemon's "
                "1 MiB host tier: raise --block-bytes or the capacity"
            )
    return ""


def run(
    args: argparse.Namespace, procs: Processes, address: str | None, progress: Any, task: Any
) -> list[Row]:
    """Every configuration in turn, each on a cluster of its own; `address` is not used."""
    requests = _requests(args)
    if args.redis:
        args = _attached_shape(args)
    configs = _configs(args, requests)
    routers = args.router
    runs = len(configs) * len(routers) * (2 if args.kill_at is not None else 1)
    progress.update(task, total=runs * len(requests))
    references: dict[int, dict[str, Hits]] = {}
    rows = []
    for nodes, capacity in configs:
        if capacity not in references:
            references[capacity] = _references(requests, capacity, args.disk_capacity_blocks)
        for policy in routers:
            progress.update(task, description=f"trace: {policy}, {nodes} nodes, {capacity} blocks")
            live = Live(args, requests, nodes, capacity, policy)
            row = live.row(live.replay(procs, progress, task), references[capacity])
            if args.kill_at is not None:
                killed = live.outcome
                live.faults = []
                baseline = live.replay(procs, progress, task)
                row.extra.update(
                    _failover(requests, killed, baseline, nodes, capacity, policy, args)
                )
            if args.chaos:
                row.extra.update(_chaos(requests, live.outcome, nodes, capacity, policy, args))
            row.extra.update(_simulated(requests, nodes, capacity, policy, args))
            rows.append(row)
    console = progress.console
    if not console.is_terminal:  # a log: wide enough for every column
        from rich.console import Console

        console = Console(width=180)
    console.print(trace_report.table(rows))
    if args.trace_plot:
        trace_report.plot(args.trace_plot, rows)
    return rows


@dataclass
class Live:
    """One configuration's live replay."""

    args: argparse.Namespace
    requests: Sequence[Request]
    nodes: int
    capacity: int
    policy: str

    def __post_init__(self) -> None:
        a = self.args
        kill = [Fault(KILL, a.kill_at, restart=False)] if a.kill_at is not None else []
        self.faults: list[Fault] = kill + (a.chaos or [])
        self.outcome = Outcome()

    def replay(self, procs: Processes, progress: Any, task: Any) -> Outcome:
        a = self.args
        salt = os.urandom(16)  # per run: no earlier run's blocks can make this one warm
        with Processes() as own:
            cluster = self._cluster(own, salt)
            try:
                with Router(
                    cluster.redis_url, seed=a.seed, policy=self.policy, secret=cluster_secret()
                ) as router:
                    replay = Replay(
                        cluster,
                        router,
                        BlockBytes(salt, a.block_bytes),
                        tiers_known=bool(a.disk_capacity_blocks) or a.fetch_through,
                        fetch_through=a.fetch_through,
                        faults=self.faults,
                        procs=own,
                        deadline_s=a.deadline,
                        speed=a.speed,
                    )
                    out = replay.run(self.requests, lambda n: progress.update(task, advance=n))
                self._finish(cluster, out)
            finally:
                cluster.close()
        if self.faults:
            self.outcome = out
        return out

    def _cluster(self, own: Processes, salt: bytes) -> trace_cluster.TraceCluster:
        a = self.args
        if a.redis:
            return trace_cluster.attach(a.redis, a.block_bytes)
        flags: list[str] = []
        if a.dirty_ratio is not None:
            flags += ["--dirty-ratio", str(a.dirty_ratio)]
        cluster = trace_cluster.start(
            own,
            self.nodes,
            self.capacity,
            a.block_bytes,
            disk_blocks=a.disk_capacity_blocks,
            flags=tuple(flags),
            timeout_s=a.deadline,
        )
        _check_hosts(own, cluster, a.block_bytes, salt)
        return cluster

    def _finish(self, cluster: trace_cluster.TraceCluster, out: Outcome) -> None:
        """What the cluster holds and wrote at the end, before its daemons stop."""
        per_node = []
        written = 0
        for i, node in enumerate(cluster.nodes):
            mine = [k for k, n in enumerate(out.node_of) if n == i]
            stats = trace_cluster.node_stats(node)
            wrote = trace_cluster.written_bytes(node) if node.disk_blocks else 0
            written += wrote or 0
            per_node.append(
                {
                    "node": node.node_id,
                    "alive": node.alive,
                    "requests": len(mine),
                    "blocks": sum(out.blocks[k] for k in mine),
                    "hits": sum(out.hits[k] for k in mine),
                    "work": sum(out.blocks[k] - out.hits[k] for k in mine),
                    "host_capacity_blocks": node.host_blocks,
                    "disk_capacity_blocks": node.disk_blocks,
                    **stats,
                }
            )
        index_bytes, copies = trace_cluster.index_stats(cluster)
        self.finished = {
            "per_node": per_node,
            "disk_bytes_written": written,
            "index_redis_bytes": index_bytes,
            "copies_per_block": round(copies, 4),
        }

    def row(self, out: Outcome, refs: dict[str, Hits]) -> Row:
        a = self.args
        figures = trace_report.extra(
            self.requests,
            out,
            refs,
            nodes=self.nodes,
            capacity_blocks=self.capacity,
            tokens_per_block=a.tokens_per_block,
            kv_bytes_per_token=a.kv_bytes_per_token,
        )
        figures.update(self.finished)
        figures.update(
            trace=a.trace.name,
            shared_prefix=a.shared_prefix,
            disk_capacity_blocks=a.disk_capacity_blocks,
            disk_capacity_gib=round(
                a.disk_capacity_blocks
                * a.tokens_per_block
                * a.kv_bytes_per_token
                / trace_report.GIB,
                2,
            ),
            kv_model=trace_report.KV_MODEL
            if a.kv_bytes_per_token == trace_report.KV_BYTES_PER_TOKEN
            else "",
            killed=out.killed,
            seed=a.seed,
        )
        path = self.policy + ("+fetch" if a.fetch_through else "")
        return trace_report.row(path, a.block_bytes, out, figures)


def _requests(args: argparse.Namespace) -> list[Request]:
    requests = load_trace(args.trace, tokens_per_block=args.tokens_per_block)
    if args.limit is not None:
        requests = requests[: args.limit]
    if args.shared_prefix:
        requests = with_shared_prefix(requests, args.tokens_per_block)
    return requests


def _configs(args: argparse.Namespace, requests: Sequence[Request]) -> list[tuple[int, int]]:
    """(nodes, capacity blocks) of every run, in order."""
    shares = args.sweep or [None]
    node_counts = args.nodes_sweep or [args.nodes]
    out = []
    for share in shares:
        if share is not None:
            capacity = share_of(requests, share)
        elif args.capacity_blocks is not None:
            capacity = args.capacity_blocks
        else:
            capacity = share_of(requests, DEFAULT_SHARE)
        out += [(n, capacity) for n in node_counts]
    return out


def _attached_shape(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the node count and host and disk blocks of the cluster at `--redis`, as
    its registry lists them, so that the references have the capacity the nodes have."""
    cluster = trace_cluster.attach(args.redis, args.block_bytes)
    cluster.close()
    return argparse.Namespace(
        **{
            **vars(args),
            "nodes": len(cluster.nodes),
            "capacity_blocks": sum(n.host_blocks for n in cluster.nodes),
            "disk_capacity_blocks": sum(n.disk_blocks for n in cluster.nodes),
        }
    )


def _references(requests: Sequence[Request], capacity: int, disk: int) -> dict[str, Hits]:
    refs = {
        "infinite": unbounded(requests),
        "single_lru": lru(requests, capacity),
        "belady": belady(requests, capacity),
    }
    if disk:
        refs["lru_disk"] = lru(requests, disk)
        refs["lru_host_disk"] = lru(requests, capacity + disk)
    return refs


def _simulated(
    requests: Sequence[Request], nodes: int, capacity: int, policy: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The same routing choice on a model of the cluster: exact index, exact LRU nodes."""
    if not nodes or args.disk_capacity_blocks:
        return {}
    sim = trace_sim.replay(requests, capacity, nodes, policy, args.seed, args.fetch_through)
    return {
        "sim_hit_ratio": round(sim.ratio, 5),
        "sim_load_max_over_mean": round(trace_metrics.spread(sim.node_of, sim.work(), nodes), 4),
    }


def _failover(
    requests: Sequence[Request],
    killed: Outcome,
    baseline: Outcome,
    nodes: int,
    capacity: int,
    policy: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """How the hit ratio came back after the kill: against the same replay without it
    (the issue's measure), and against the exact model of the same kill (same node, same
    request), which loses the same blocks: what no router can win back is in both."""
    k = args.kill_at
    model = trace_sim.replay(
        requests, capacity, nodes, policy, args.seed, args.fetch_through, faults=_model(killed)
    )
    vs_baseline = _recovery(killed.blocks, killed.hits, baseline.blocks, baseline.hits, k)
    vs_model = _recovery(killed.blocks, killed.hits, model.blocks, model.hits, k)
    return {
        "kill_at": k,
        "recovered_after_requests": vs_baseline[0],
        "worst_window_vs_no_kill": vs_baseline[1],
        "recovered_after_requests_vs_model": vs_model[0],
        "worst_window_vs_model": vs_model[1],
        "baseline_hit_ratio": round(sum(baseline.hits) / sum(baseline.blocks), 5),
        "sim_kill_hit_ratio": round(model.ratio, 5),
        "hit_ratio_over_time_without_kill": [
            round(x, 4) for x in trace_metrics.hit_ratio_over_time(baseline.blocks, baseline.hits)
        ],
        "sim_kill_hit_ratio_over_time": [
            round(x, 4) for x in trace_metrics.hit_ratio_over_time(model.blocks, model.hits)
        ],
    }


def _model(out: Outcome) -> trace_sim.Faults:
    """The faults of a live replay, as the model takes them."""
    return trace_sim.Faults(dict(out.kills), dict(out.backs), frozenset(out.blind))


def _chaos(
    requests: Sequence[Request],
    out: Outcome,
    nodes: int,
    capacity: int,
    policy: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The run under faults against the exact model of the same faults: the same nodes
    killed at the same requests and back at the same requests, the same requests routed
    while Redis was away. What the model cannot know is how long the index lagged."""
    model = trace_sim.replay(
        requests, capacity, nodes, policy, args.seed, args.fetch_through, faults=_model(out)
    )
    live = sum(out.hits) / sum(out.blocks)
    vs = _windows_vs(out.blocks, out.hits, model.blocks, model.hits)
    return {
        "faults": [str(f) for f in args.chaos],
        "deadline_s": args.deadline,
        "late": out.late,
        "slowest_s": {
            str(i): round(out.latency_s[i], 3) for i in np.argsort(out.latency_s)[::-1][:5]
        },
        "blind_routed": len(out.blind),
        "nodes_back": {str(at): back for at, back in out.backs.items()},
        "chaos_model_hit_ratio": round(model.ratio, 5),
        "hit_ratio_vs_chaos_model": round(live / model.ratio, 4) if model.ratio else None,
        "worst_window_vs_chaos_model": round(float(vs.min()), 4),
        "worst_window_starts_at": int(vs.argmin()),
        "chaos_model_hit_ratio_over_time": [
            round(x, 4) for x in trace_metrics.hit_ratio_over_time(model.blocks, model.hits)
        ],
    }


def _recovery(
    blocks: Sequence[int],
    hits: Sequence[int],
    ref_blocks: Sequence[int],
    ref_hits: Sequence[int],
    kill_at: int,
) -> tuple[int | None, float | None]:
    """(requests after the kill until the hit ratio over 200-request windows is at least
    0.8 of the reference's same windows and stays there to the end: the end of the first
    window of that run, None if the last window fails; the worst window's ratio). Only
    windows that start at or after the kill count, so the first ends 199 after it."""
    vs = _windows_vs(blocks, hits, ref_blocks, ref_hits)
    after = None
    for start in range(len(vs) - 1, kill_at - 1, -1):  # the good run, from the end back
        if not vs[start] >= RECOVERY_SHARE:
            break
        after = start + RECOVERY_WINDOW - 1 - kill_at
    vs = vs[kill_at:]
    return after, (round(float(vs.min()), 4) if len(vs) else None)


def _windows_vs(
    blocks: Sequence[int], hits: Sequence[int], ref_blocks: Sequence[int], ref_hits: Sequence[int]
) -> np.ndarray:
    """Per 200-request window (by its first request), the hit ratio over the reference's
    in the same window; 1 where the reference hit nothing."""
    mine = trace_metrics.sliding_hit_ratio(blocks, hits, RECOVERY_WINDOW)
    theirs = trace_metrics.sliding_hit_ratio(ref_blocks, ref_hits, RECOVERY_WINDOW)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(theirs > 0, mine / theirs, 1.0)


def _check_hosts(
    own: Processes, cluster: trace_cluster.TraceCluster, block_bytes: int, salt: bytes
) -> None:
    """Prove each host tier's size: on the nodes themselves, or, where a disk tier below
    would keep what the check puts, on a scratch daemon with the same host capacity."""
    if not any(n.disk_blocks for n in cluster.nodes):
        for node in cluster.nodes:
            trace_cluster.check_host(
                node.connect(), node.host_blocks, block_bytes, salt, node.node_id
            )
        return
    for blocks in sorted({n.host_blocks for n in cluster.nodes}):
        address = own.daemon("--host-capacity", str(trace_cluster.host_bytes(blocks, block_bytes)))
        with Client(address) as client:
            trace_cluster.check_host(client, blocks, block_bytes, salt, f"scratch-{blocks}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvstore.bench.trace`: the subcommand on its own."""
    from rich.console import Console
    from rich.progress import Progress

    from kvstore.bench.cli import _choices, _ints, _sizes
    from kvstore.bench.report import write_json

    parser = argparse.ArgumentParser(
        prog="python -m kvstore.bench.trace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="ties of the routers")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    add_arguments(parser, _choices, _ints, _sizes)
    args = parser.parse_args(argv)
    if problem := check(args):
        parser.error(problem)
    with Processes() as procs, Progress(console=Console(stderr=True), transient=True) as progress:
        rows = run(args, procs, None, progress, progress.add_task("trace", total=None))
    if args.json:
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json(args.json, params, rows, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
