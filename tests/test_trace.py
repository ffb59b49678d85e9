"""Trace replay: the strict parser, the offline references against an independent
computation, and the load metrics (the live replay's own tests come after them)."""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from test_cluster_index import poll

from conftest import CLUSTER_SECRET
from kvstore.bench import trace as trace_bench
from kvstore.bench import trace_cluster, trace_sim
from kvstore.bench import trace_metrics as metrics
from kvstore.bench import trace_refs as refs
from kvstore.bench.cli import _choices, _ints, _sizes
from kvstore.bench.procs import Processes
from kvstore.bench.trace_format import (
    TraceError,
    load_trace,
    parse_lines,
    share_of,
    with_shared_prefix,
)
from kvstore.bench.trace_replay import BlockBytes, Replay
from kvstore.router import Router


def line(ts: int = 0, n: int = 1024, out: int = 1, ids: object = (0, 1), **extra: object) -> str:
    obj = {"timestamp": ts, "input_length": n, "output_length": out}
    obj["hash_ids"] = list(ids) if isinstance(ids, tuple) else ids
    obj.update(extra)
    return json.dumps(obj)


def trace(*chains: tuple[int, ...]):
    """Requests of full 512-token blocks, one a millisecond."""
    return parse_lines(line(i, 512 * len(c), 1, c) for i, c in enumerate(chains))


# -- the parser


@pytest.mark.parametrize(
    "text, field, words",
    [
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids", "missing"),
        ('{"input_length": 10, "output_length": 1, "hash_ids": [0]}', "timestamp", "missing"),
        ('{"timestamp": 0, "output_length": 1, "hash_ids": [0]}', "input_length", "missing"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [0]}', "output_length", "missing"),
        (line(ids=(0, "x")), "hash_ids", "id 1 is not an integer"),
        (line(ids=(0, 1.0)), "hash_ids", "not an integer"),
        (line(ids=(0, True)), "hash_ids", "not an integer"),
        (line(ids=(0, -1)), "hash_ids", "negative"),
        (line(ids="0,1"), "hash_ids", "expected a list"),
        (line(n=1025), "hash_ids", "expected ceil(1025 / 512) = 3"),
        (line(ts=-5), "timestamp", ">= 0"),
        (line(ts="3"), "timestamp", "integer"),
        (line(ts=1.5), "timestamp", "integer"),
        (line(n=0, ids=()), "input_length", ">= 1"),
        (line(out=False), "output_length", "integer"),
        (line(out=-1), "output_length", ">= 0"),
        (line(ids=(0, 0)), "hash_ids", "repeats"),
        ("[1, 2]", None, "JSON object"),
        ("{nope", None, "not valid JSON"),
        ("", None, "empty line"),
    ],
)
def test_a_malformed_line_names_its_line_and_field(text: str, field: str, words: str) -> None:
    good = line(ts=0, ids=(7, 8))
    with pytest.raises(TraceError) as err:
        parse_lines([good, good, text])
    assert (err.value.line, err.value.field) == (3, field)
    assert str(err.value).startswith("line 3") and words in str(err.value)


def test_time_going_backwards_and_broken_chains_are_errors() -> None:
    with pytest.raises(TraceError) as err:
        parse_lines([line(ts=10), line(ts=10), line(ts=9)])
    assert (err.value.line, err.value.field) == (3, "timestamp")
    assert "backwards: 9 after 10" in str(err.value)
    with pytest.raises(TraceError) as err:
        parse_lines([line(ids=(0, 1)), line(ids=(2, 1))])  # 1 follows 0, then 2
    assert (err.value.line, err.value.field) == (2, "hash_ids") and "chained" in str(err.value)
    assert len(parse_lines([line(ids=(0, 1)), line(ids=(2, 1))], check_chain=False)) == 2


def test_partial_blocks_extra_keys_and_the_file_reader(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(line(n=1000, extra_field=3) + "\n" + line(ts=5, n=600, ids=(0, 2)) + "\n")
    a, b = load_trace(path)
    assert (a.hash_ids, a.output_length, a.block_tokens(1)) == ((0, 1), 1, 488)
    assert [b.block_tokens(i) for i in range(2)] == [512, 88]
    with pytest.raises(TraceError) as err:
        load_trace(path, tokens_per_block=256)  # 1000 tokens are 4 blocks of 256
    assert (err.value.line, err.value.field) == (1, "hash_ids")
    (c,) = parse_lines([line(n=600, ids=(0, 2, 3))], tokens_per_block=256)
    assert [c.block_tokens(i, 256) for i in range(3)] == [256, 256, 88]


def test_the_shared_system_prompt_variant() -> None:
    t = with_shared_prefix(trace((0, 1), (0, 2)))
    assert [r.hash_ids for r in t] == [(3, 0, 1), (3, 0, 2)]
    assert [r.input_length for r in t] == [1536, 1536]
    assert refs.unbounded(t).per_request == (0, 2)
    assert parse_lines([line(0, r.input_length, 1, r.hash_ids) for r in t])  # still chained


# -- the references, against a computation written independently


def slow_unbounded(requests) -> list[int]:
    hits = []
    for t, r in enumerate(requests):
        earlier = {b for q in requests[:t] for b in q.hash_ids}
        hits.append(
            next((i for i, b in enumerate(r.hash_ids) if b not in earlier), len(r.hash_ids))
        )
    return hits


def slow_lru(requests, capacity: int) -> list[int]:
    """Recency as a clock per block; the smallest clock goes."""
    touched: dict[int, int] = {}
    clock, hits = 0, []
    for r in requests:
        hits.append(leading(r.hash_ids, touched))
        for b in reversed(r.hash_ids):
            clock += 1
            touched[b] = clock
            if len(touched) > capacity:
                del touched[min(touched, key=touched.get)]
    return hits


def slow_belady(requests, capacity: int) -> list[int]:
    """Next uses found by scanning the rest of the trace at every eviction."""
    touched: dict[int, int] = {}
    clock, hits = 0, []
    for t, r in enumerate(requests):
        hits.append(leading(r.hash_ids, touched))
        for b in reversed(r.hash_ids):
            clock += 1
            touched[b] = clock
            if len(touched) > capacity:
                later = requests[t + 1 :]
                victim = max(touched, key=lambda x: (next_use(x, later), -touched[x]))
                del touched[victim]
    return hits


def next_use(block: int, later) -> float:
    return next((u for u, q in enumerate(later) if block in q.hash_ids), float("inf"))


def leading(ids, held) -> int:
    return next((i for i, b in enumerate(ids) if b not in held), len(ids))


def test_lru_and_belady_differ_by_hand() -> None:
    t = trace((1,), (2,), (3,), (1,), (2,))  # capacity 2: LRU loses 1 and 2, MIN drops 3
    assert refs.lru(t, 2).per_request == (0, 0, 0, 0, 0) == tuple(slow_lru(t, 2))
    assert refs.belady(t, 2).per_request == (0, 0, 0, 1, 1) == tuple(slow_belady(t, 2))
    assert refs.unbounded(t).per_request == (0, 0, 0, 1, 1) == tuple(slow_unbounded(t))
    t = trace((1, 2), (3,), (1, 2))  # tail first: 2 is least recent, so 3 evicts it
    assert refs.lru(t, 2).per_request == (0, 0, 1) == tuple(slow_lru(t, 2))
    assert refs.belady(t, 2).per_request == (0, 0, 2) == tuple(slow_belady(t, 2))
    t = trace((1, 2, 3), (1, 2, 3))  # MIN's tie: all next used at 1; the deepest goes
    assert refs.belady(t, 2).per_request == (0, 2) == tuple(slow_belady(t, 2))
    t = trace((1, 2), (3, 4), (1, 2))  # a block held after a missing one is no hit
    assert refs.lru(t, 3).per_request == (0, 0, 1)


def test_token_ratios_count_partial_last_blocks() -> None:
    t = parse_lines([line(0, 1000, 1, (1, 2)), line(1, 700, 1, (1, 3)), line(2, 1000, 1, (1, 2))])
    hits = refs.unbounded(t)
    assert hits.per_request == (0, 1, 2) == tuple(slow_unbounded(t))
    assert hits.ratio(t) == pytest.approx(3 / 6)
    assert hits.token_ratio(t) == pytest.approx((512 + 1000) / 2700)  # 488 of block 1 count
    assert refs.hit_tokens(t, hits.per_request) == 512 + 1000
    lru1 = refs.lru(t, 1)  # one block: the request's first, touched last
    assert lru1.per_request == (0, 1, 1) == tuple(slow_lru(t, 1))
    assert lru1.token_ratio(t) == pytest.approx(1024 / 2700)
    short = parse_lines([line(0, 300, 1, (5,)), line(1, 300, 1, (5,))])
    assert refs.lru(short, 4).token_ratio(short) == pytest.approx(300 / 600)


def random_trace(seed: int, requests: int = 120):
    """Chained prompts drawn from a small tree of shared prefixes, partial last blocks."""
    rng = random.Random(seed)
    prompts: list[tuple[int, ...]] = []
    ids = iter(range(10**6))
    lines = []
    for t in range(requests):
        if prompts and rng.random() < 0.7:
            base = rng.choice(prompts)
            chain = base[: rng.randint(1, len(base))]
        else:
            chain = ()
        chain += tuple(next(ids) for _ in range(rng.randint(0 if chain else 1, 4)))
        prompts.append(chain)
        n = 512 * (len(chain) - 1) + rng.randint(1, 512)
        lines.append(line(t * 10, n, rng.randint(0, 99), chain))
    return parse_lines(lines)


@pytest.mark.parametrize("seed", range(4))
def test_references_match_the_independent_computation(seed: int) -> None:
    t = random_trace(seed)
    assert refs.unbounded(t).per_request == tuple(slow_unbounded(t))
    for capacity in (1, 3, 8, 25):
        assert refs.lru(t, capacity).per_request == tuple(slow_lru(t, capacity)), capacity
        assert refs.belady(t, capacity).per_request == tuple(slow_belady(t, capacity)), capacity
        r = refs.References.of(t, capacity)
        assert r.single_lru.total <= r.unbounded.total and r.belady.total <= r.unbounded.total


def test_capacities() -> None:
    assert refs.node_capacities(10981, 4) == [2746, 2745, 2745, 2745]
    assert refs.node_capacities(10, 3) == [4, 3, 3] and sum(refs.node_capacities(7, 8)) == 7
    assert share_of(trace((1, 2), (3,), (1, 4)), 0.5) == 2


# -- load metrics


def test_spread_and_windows() -> None:
    assert metrics.spread([0, 1, 0, 1], [1, 1, 3, 1], 2) == pytest.approx(4 / 3)
    w = metrics.windows([0, 1, 0, 1], [1, 1, 3, 1], 2, size=2)
    assert w["max"] == pytest.approx(1.5)  # window [3, 1]: 3 / 2
    assert w["attainable_max"] == pytest.approx(1.0)  # 3 is one request: unavoidable
    assert w["infeasible"] == pytest.approx(2 / 3)
    assert metrics.shortest_balanced_window([0, 1] * 100, [1] * 200, 2) == 100
    assert metrics.hit_ratio_over_time([2, 2, 4], [1, 2, 0], 2) == [0.75, 0.0]
    assert list(metrics.sliding_hit_ratio([2, 2, 4], [1, 2, 0], 2)) == [0.75, 2 / 6]


# -- the live replay: real daemons, a real redis-server


SHIPPED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
SHIPPED = SHIPPED / "mooncake_synthetic_trace.jsonl"
live = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")


class Quiet:
    """What the bench's plugins get as `progress`, printing nowhere."""

    console = Console(file=io.StringIO())

    def update(self, *args: object, **kw: object) -> None:
        pass


def bench_args(path: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    trace_bench.add_arguments(parser, _choices, _ints, _sizes)
    return parser.parse_args([str(path), *flags])


def replayed(path: Path, *flags: str) -> list[dict]:
    """The bench's rows for `path` with `flags`, as --json writes them (extra flattened)."""
    args = bench_args(path, *flags)
    assert trace_bench.check(args) == ""
    with Processes() as procs:
        rows = trace_bench.run(args, procs, None, Quiet(), None)
    return [{**vars(row), **row.extra} for row in rows]


def shipped(tmp_path: Path) -> Path:
    if not SHIPPED.exists():
        pytest.skip(f"the shipped trace is not at {SHIPPED}")
    return SHIPPED


def test_check_names_the_bad_line_and_refuses_what_cannot_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line(ts=5) + "\n" + line(ts=4, ids=(0, 1)) + "\n")
    problem = trace_bench.check(bench_args(path))
    assert "line 2, field 'timestamp'" in problem and "backwards" in problem
    path.write_text(line(ts=0, ids=(0, 1)) + "\n" + line(ts=1, ids=(0, 2)) + "\n")
    assert "--redis replays" in trace_bench.check(
        bench_args(path, "--redis", "redis://h:1", "--sweep", "0.5")
    )
    assert "1 MiB host tier" in trace_bench.check(bench_args(path, "--capacity-blocks", "8"))
    assert "--kill-at" in trace_bench.check(bench_args(path, "--kill-at", "5"))
    assert (
        trace_bench.check(
            bench_args(path, "--fetch-through", "--capacity-blocks", "4", "--block-bytes", "1MiB")
        )
        == ""
    )


@live
def test_every_hit_is_served_and_byte_exact(tmp_path: Path) -> None:
    (row,) = replayed(shipped(tmp_path), "--limit", "400", "--nodes", "2")
    assert row["scenario"] == "trace" and row["path"] == "cost" and row["requests"] == 400
    assert row["corrupt"] == row["errors"] == row["failovers"] == 0
    assert row["verified_blocks"] == row["hits_by_tier"]["host"] > 0
    blocks = sum(n["blocks"] for n in row["per_node"])
    assert row["hit_ratio"] == pytest.approx(row["verified_blocks"] / blocks, abs=1e-5)
    assert 0 < row["hit_ratio"] <= row["ref_infinite"]
    saved = row["token_hit_ratio"] * row["prefill_tokens"]
    assert 0 < row["prefill_tokens_saved"] == pytest.approx(saved, abs=1e-5 * row["prefill_tokens"])
    assert row["capacity_blocks"] == sum(n["host_capacity_blocks"] for n in row["per_node"])
    assert all(n["host_blocks"] <= n["host_capacity_blocks"] for n in row["per_node"])


@live
def test_a_wrong_or_foreign_block_is_caught_and_never_counted(tmp_path: Path) -> None:
    requests = trace((1, 2, 3), (1, 2, 3, 4))
    salt = b"s" * 16
    data = BlockBytes(salt, 64 << 10)
    assert not data.holds(2, BlockBytes(b"t" * 16, 64 << 10).payload(2))  # another run's
    assert not data.holds(2, data.payload(3)) and data.holds(3, data.payload(3))
    with Processes() as procs:
        cluster = trace_cluster.start(procs, 1, 16, 64 << 10)
        with Router(cluster.redis_url, secret=CLUSTER_SECRET) as router:
            replay = Replay(cluster, router, data)
            replay.request(0, requests[0])
            client = cluster.nodes[0].connect()
            client.delete([data.key(2)])
            client.put([data.key(2)], [data.payload(9)])  # the right key, the wrong bytes
            replay.request(1, requests[1])
        cluster.close()
    out = replay.outcome
    assert out.hits == [0, 1] and out.corrupt == 1 and out.verified == 1


@live
def test_a_prefix_every_request_shares_spreads_with_cost_and_herds_with_prefix(
    tmp_path: Path,
) -> None:
    rows = replayed(
        shipped(tmp_path), "--limit", "400", "--shared-prefix", "--router", "cost,prefix"
    )
    cost, prefix = rows
    assert cost["load_max_over_mean"] <= 1.1
    assert all(n["requests"] > 0 for n in cost["per_node"])
    print(
        f"\nshared first block, 4 nodes: load spread cost {cost['load_max_over_mean']}, "
        f"prefix {prefix['load_max_over_mean']}"
    )
    assert prefix["load_max_over_mean"] > cost["load_max_over_mean"]  # reported as it is
    for row in rows:
        assert row["corrupt"] == row["errors"] == 0


@live
def test_fetch_through_serves_a_prefix_another_node_holds(tmp_path: Path) -> None:
    requests = trace((1, 2, 3, 4), (1, 2, 3, 4, 5))
    data = BlockBytes(b"f" * 16, 64 << 10)
    with Processes() as procs:
        cluster = trace_cluster.start(procs, 2, 32, 64 << 10)
        with Router(cluster.redis_url, seed=0, secret=CLUSTER_SECRET) as router:
            replay = Replay(cluster, router, data, tiers_known=True, fetch_through=True)
            replay.request(0, requests[0])
            holder = cluster.nodes[replay.outcome.node_of[0]].node_id
            keys = [data.key(b) for b in requests[0].hash_ids]
            poll(lambda: [(x.node_id, x.matched) for x in router.locate(keys)] == [(holder, 4)])
            router.failed(holder)  # so the next request goes to the other node
            replay.request(1, requests[1])
        cluster.close()
    out = replay.outcome
    assert out.node_of[1] != out.node_of[0] and out.hits == [0, 4]
    assert out.fetched == 4 and out.hits_by_tier == {"fetched": 4} and out.corrupt == 0


@live
def test_the_disk_tier_keeps_blocks_hit_on_it(tmp_path: Path) -> None:
    """One node, a host tier of 4 blocks over a disk tier of 16 (4 segments of 4)."""
    a, b, c, d, e, f = [tuple(range(4 * i + 1, 4 * i + 5)) for i in range(6)]
    requests = trace(a, b, a, c, a, d, e, f, a, b)
    size = 256 << 10
    with Processes() as procs:
        cluster = trace_cluster.start(
            procs, 1, 4, size, disk_blocks=16, flags=("--dirty-ratio", "0")
        )
        with Router(cluster.redis_url, secret=CLUSTER_SECRET) as router:
            replay = Replay(cluster, router, BlockBytes(b"d" * 16, size), tiers_known=True)
            for i, r in enumerate(requests):
                replay.request(i, r)
        cluster.close()
    out = replay.outcome
    # a is read from disk and promoted (2), evicted from the host by c, found again (4);
    # e and f evict the oldest segments: a, read since written, is copied forward and
    # found (8); b, never read, went with its segment (9)
    assert out.hits == [0, 0, 4, 0, 4, 0, 0, 0, 4, 0]
    assert out.hits_by_tier == {"disk": 12} and out.corrupt == out.errors == 0


@live
def test_a_node_killed_mid_replay_fails_over_and_the_hits_recover(tmp_path: Path) -> None:
    """What the kill loses is the dead node's blocks, recomputed only at their next use, so
    the hits come back as they do in the exact model of the same kill (same node, same
    request): the failover itself costs nothing more. Against the run without the kill,
    they come back only as fast as the trace reuses those prefixes (reported, see README)."""
    flags = ("--limit", "2000", "--kill-at", "1000", "--sweep", "1", "--block-bytes", "8KiB")
    (row,) = replayed(shipped(tmp_path), *flags)
    assert row["killed"] and row["failovers"] >= 1
    assert row["errors"] == row["corrupt"] == 0
    assert row["recovered_after_requests_vs_model"] is not None
    assert row["recovered_after_requests_vs_model"] <= 500
    assert row["hit_ratio"] >= 0.95 * row["sim_kill_hit_ratio"]  # the failover lost no more
    print(
        f"\nkilled at 1000: back to 0.8 of the run without the kill after "
        f"{row['recovered_after_requests']} requests, of the model after "
        f"{row['recovered_after_requests_vs_model']}"
    )
    dead = next(n for n in row["per_node"] if n["node"] == row["killed"])
    assert not dead["alive"] and dead["requests"] > 0


def test_the_model_of_faults_loses_a_killed_nodes_blocks_and_routes_blind_by_load() -> None:
    requests = trace((1, 2, 3), (1, 2, 3), (4, 5), (1, 2, 3), (1, 2, 3), (1, 2, 3))
    calm = trace_sim.replay(requests, 8, 2)
    assert calm.hits == [0, 3, 0, 3, 3, 3]
    node = calm.node_of[1]
    # the holder dies before request 3 (which goes elsewhere, cold) and is back, empty,
    # for request 4; request 5 is routed blind: by load alone, to the node with less work
    faults = trace_sim.Faults(kills={3: node}, backs={4: [node]}, blind=frozenset({5}))
    hurt = trace_sim.replay(requests, 8, 2, faults=faults)
    assert hurt.node_of[3] != node and hurt.hits[:4] == [0, 3, 0, 0]
    assert hurt.hits[4] == 3 and hurt.node_of[4] == hurt.node_of[3]
    assert hurt.node_of[5] == node and hurt.hits[5] == 0


def test_chaos_faults_parse_in_request_order_and_bad_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(line(ts=i, ids=(2 * i, 2 * i + 1)) for i in range(10)) + "\n")
    args = bench_args(path, "--chaos", "redis-stall@5:1.5,kill@2, redis-restart@3")
    assert [str(f) for f in args.chaos] == ["kill@2", "redis-restart@3", "redis-stall@5:1.5"]
    for bad in ("kill@0", "stall@3", "redis-stall@3", "kill@2:1", "kill@x", "kill@2,kill@2"):
        with pytest.raises(SystemExit):
            bench_args(path, "--chaos", bad)
    assert "within the 10" in trace_bench.check(bench_args(path, "--chaos", "kill@10"))
    assert "no --kill-at" in trace_bench.check(
        bench_args(path, "--chaos", "kill@2", "--kill-at", "3")
    )


@live
def test_chaos_nodes_killed_and_redis_restarted_and_stalled_lose_nothing_and_block_no_one(
    tmp_path: Path,
) -> None:
    """Two nodes SIGKILLed (each started again, empty), Redis restarted empty and stopped
    for 3 s, in one replay: every hit byte-exact, no request fails or outlives its
    deadline (routing goes on by load while Redis is away), both nodes serve again, and
    the hit ratio is the exact model's of the same faults."""
    faults = "kill@200,redis-restart@450,redis-stall@700:3,kill@950"
    flags = ("--limit", "1200", "--sweep", "1", "--block-bytes", "8KiB", "--chaos", faults)
    (row,) = replayed(shipped(tmp_path), *flags)
    assert row["corrupt"] == row["errors"] == row["late"] == 0
    assert row["failovers"] >= 2 and row["blind_routed"] > 0
    assert len(row["nodes_back"]) == 2  # each killed node came back and took requests
    assert all(n["alive"] and n["requests"] > 0 for n in row["per_node"])
    assert row["hit_ratio_vs_chaos_model"] >= 0.9
    print(
        f"\nchaos: hit ratio {row['hit_ratio']} vs the model's {row['chaos_model_hit_ratio']}, "
        f"{row['blind_routed']} routed blind, slowest {row['slowest_s']}"
    )


@live
def test_a_cluster_already_up_replays_with_its_own_shape_and_starts_cold(tmp_path: Path) -> None:
    """`--redis`: the nodes registered there, their capacity read from the registry, and a
    salt per run, so the second run finds none of the first run's blocks."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(line(t, 1024, 1, (0, t % 4 + 1)) + "\n" for t in range(40)))
    with Processes() as procs:
        cluster = trace_cluster.start(procs, 2, 64, 64 << 10)
        flags = ("--redis", cluster.redis_url, "--block-bytes", "64KiB")
        first, second = (replayed(path, *flags)[0] for _ in range(2))
        cluster.close()
    for row in (first, second):
        assert (row["nodes"], row["capacity_blocks"]) == (2, 64)
        assert row["corrupt"] == row["errors"] == 0 and row["requests"] == 40
        assert 0 < row["hit_ratio"] <= row["ref_infinite"]  # warm from run one: above it
        assert row["ref_single_lru"] == row["ref_infinite"]  # 64 blocks hold all five
