"""The cluster location index against real redis-servers: a single one, and a 3-shard cluster.

Run as a script, this file is a node process that tests SIGKILL:
`python test_cluster_index.py URL NODE_ID TTL_S KEY_HEX...` (blocks in its host tier).
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from conftest import CLUSTER_SECRET
from kvstore.cluster import ClusterIndex, Load, NodeUsage, TierUsage
from kvstore.cluster.layout import Layout
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.keys import block_keys
from kvstore.router import Router
from kvstore.trust import ClusterSecret

SECRET = ClusterSecret.read(CLUSTER_SECRET)

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")

T = TypeVar("T")
FAST = {"heartbeat_s": 0.05, "ttl_s": 1.0, "max_backoff_s": 0.2}  # short clocks for tests


def poll(condition: Callable[[], T], timeout: float = 15.0) -> T:
    """The first truthy value of `condition()`; fails with the last one after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout}s; last value: {value!r}")
        time.sleep(0.02)
    return value


def free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55535:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class RedisServer:
    def __init__(self, workdir: Path, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.flags = flags
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
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
            str(self.workdir),
            *self.flags,
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        poll(lambda: _pings(client), timeout=10)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing saved (and nothing to load: `--save ''`)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
def later(tmp_path: Path) -> Iterator[RedisServer]:
    """A server the test starts itself, when it wants Redis to come up."""
    srv = RedisServer(tmp_path / "later")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three masters, no replicas; skipped where redis-cli cannot build a cluster."""
    root = tmp_path_factory.mktemp("cluster")
    shards = [
        RedisServer(
            root / str(i), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
        ).start()
        for i in range(3)
    ]
    try:
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in shards),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            pytest.skip(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
        clients = [redis.Redis(port=s.port) for s in shards]
        poll(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients))
        yield shards
    finally:
        for s in shards:
            s.stop()


@pytest.fixture(params=["redis", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """A single Redis, or an emptied 3-shard Redis Cluster (redis+cluster://)."""
    if request.param == "redis":
        return request.getfixturevalue("server").url
    shards = request.getfixturevalue("cluster")
    for s in shards:
        redis.Redis(port=s.port).flushall()
    return f"redis+cluster://127.0.0.1:{shards[0].port}"


def chain(n: int, seed: int = 0) -> list[bytes]:
    """The block keys of a seeded random prompt of n blocks of 16 tokens."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * 16)
    return block_keys(tokens, block_size=16)


class Node:
    """A fake node: its blocks, as its store would list them, and its index."""

    def __init__(
        self,
        url: str,
        node_id: str,
        held: dict[bytes, str] | None = None,
        gated: bool = False,
        **kw,
    ):
        self.held = dict(held or {})
        self.lock = threading.Lock()
        self.gate = threading.Event()  # listing() waits for it: `gated` holds the re-publish
        if not gated:
            self.gate.set()
        kw = {**FAST, **kw}
        self.index = ClusterIndex(
            url, node_id, f"{node_id}.grpc:1", self.listing, data_address=f"{node_id}.data:2",
            secret=SECRET, **kw,
        )  # fmt: skip

    def listing(self) -> list[tuple[bytes, str]]:
        self.gate.wait()
        with self.lock:
            return list(self.held.items())

    def store(self, keys: list[bytes], tier: str) -> None:
        with self.lock:
            self.held.update(dict.fromkeys(keys, tier))
        self.index.stored(keys, tier)


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    """Nodes that are closed at the end of the test, whatever happened in it."""
    made: list[Node] = []

    def make(*args: object, **kw: object) -> Node:
        made.append(Node(*args, **kw))
        return made[-1]

    yield make
    for node in made:
        node.gate.set()
        node.index.close()


def holding(keys: list[bytes], tier: str = "host") -> dict[bytes, str]:
    return dict.fromkeys(keys, tier)


def ranking(router: Router | ClusterIndex, keys: list[bytes]) -> list[tuple[str, int]]:
    return [(loc.node_id, loc.matched) for loc in router.locate(keys)]


@pytest.fixture
def spawn_node() -> Iterator[Callable[..., subprocess.Popen]]:
    """Nodes in their own processes (this file as a script), once they have published."""
    procs: list[subprocess.Popen] = []

    def spawn(url: str, node_id: str, ttl_s: float, keys: list[bytes]) -> subprocess.Popen:
        cmd = [sys.executable, __file__, url, node_id, str(ttl_s), *(k.hex() for k in keys)]
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
        assert procs[-1].stdout.readline().strip() == "ready"
        return procs[-1]

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait()


def test_routes_to_the_longest_prefix(url: str, make_node: Callable[..., Node]) -> None:
    keys = chain(8)
    make_node(url, "a", holding(keys))
    make_node(url, "b", holding(keys[:4], "device"))
    make_node(url, "c", holding([keys[0], keys[2]]))  # a gap after the first block
    d = make_node(url, "d", holding(keys[1:]))  # no first block: holds no prefix at all
    with Router(url, seed=1, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 8), ("b", 4), ("c", 1)])
        best = router.locate(keys)[0]
        assert (best.address, best.data_address, best.tiers) == (
            "a.grpc:1",
            "a.data:2",
            {"host": 8},
        )
        assert router.locate(keys)[1].tiers == {"device": 4}
        assert ranking(d.index, keys) == ranking(router, keys)  # a node's Locate, same answer
        assert ranking(router, keys[:2]) == [("b", 2), ("a", 2), ("c", 1)]  # device > host
        assert router.locate(chain(3, seed=9)) == []


def test_locate_tokens_hashes_the_prompt(
    server: RedisServer, make_node: Callable[..., Node]
) -> None:
    tokens = np.random.default_rng(3).integers(0, 50_000, 1000)
    keys = block_keys(tokens, block_size=256, salt=b"model-a")
    make_node(server.url, "a", holding(keys))
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 3)])
        assert ranking_tokens(router, tokens, b"model-a") == [("a", 3)]
        assert ranking_tokens(router, tokens, b"model-b") == []  # another namespace
        assert router.locate_tokens(tokens[:255], 256) == []  # no full block


def ranking_tokens(router: Router, tokens: np.ndarray, salt: bytes) -> list[tuple[str, int]]:
    return [(loc.node_id, loc.matched) for loc in router.locate_tokens(tokens, 256, salt)]


def test_ties_spread_over_the_holders(server: RedisServer, make_node: Callable[..., Node]) -> None:
    keys = chain(4)
    for name in "abc":
        make_node(server.url, name, holding(keys))
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: len(router.locate(keys)) == 3)
    firsts = []
    for _ in range(2):  # the same seed, the same choices
        with Router(server.url, seed=7, secret=CLUSTER_SECRET) as router:
            firsts.append([router.locate(keys)[0].node_id for _ in range(60)])
    assert len(set(firsts[0])) > 1
    assert firsts[0] == firsts[1]


def test_tier_weights_order_nodes(server: RedisServer, make_node: Callable[..., Node]) -> None:
    keys = chain(4)
    for tier in ("disk", "host", "device"):
        make_node(server.url, tier, holding(keys, tier))
    with (
        Router(server.url, secret=CLUSTER_SECRET) as router,
        Router(server.url, {"disk": 2.0}, secret=CLUSTER_SECRET) as disk_first,
    ):
        poll(lambda: len(router.locate(keys)) == 3)
        assert [(loc.node_id, loc.score) for loc in router.locate(keys)] == [
            ("device", 4.0),
            ("host", pytest.approx(3.2)),
            ("disk", 2.0),
        ]
        assert [loc.node_id for loc in disk_first.locate(keys)] == ["disk", "device", "host"]


def test_load_counts_and_the_registry_reports_usage(
    server: RedisServer, make_node: Callable[..., Node]
) -> None:
    keys = chain(4)
    usage = NodeUsage((TierUsage("host", 1 << 30, 1 << 20, 4),), Load(inflight=5, bytes_per_s=1e9))
    make_node(server.url, "busy", holding(keys), usage=lambda: usage)
    make_node(server.url, "idle", holding(keys))
    with Router(server.url, seed=3, secret=CLUSTER_SECRET) as router:
        poll(lambda: len(router.locate(keys)) == 2)
        assert all(router.locate(keys)[0].node_id == "idle" for _ in range(20))
        assert router.locate(keys)[1].load == Load(5, 1e9)
        records = {r.node_id: r for r in router.nodes()}
        assert records["busy"].usage == usage
        assert (records["idle"].address, records["idle"].incarnation) == ("idle.grpc:1", 1)


def forge_holder(
    r: redis.Redis | RedisCluster,
    slot: int,
    node_id: str,
    address: str,
    keys: list[bytes],
    *,
    inc: str = "1",
    load: str = "[0, 0.0]",
    data: str | None = None,
) -> None:
    """Write into Redis a node record signed with the suite's secret (the fields as
    `Registry.heartbeat` signs them), holding `keys` in its host tier."""
    layout = Layout()
    data = address if data is None else data
    expires = int(time.time()) + 600
    sig = SECRET.mac(b"node-record", node_id, inc, slot, address, data, expires).hex()
    record = {"id": node_id, "inc": inc, "tok": "t", "addr": address, "data": data}
    record |= {"tiers": "[]", "load": load, "exp": expires, "sig": sig}
    r.hset(layout.node(slot), mapping=record)
    r.hset(layout.ids, node_id, slot)
    for key in keys:
        name = layout.block(key)
        r.set(name, (r.get(name) or b"") + (slot * 4 + 1).to_bytes(4, "big"))


def test_a_record_that_does_not_decode_is_as_if_absent(
    url: str, make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    """A buggy node's record (signed, with a `load` that is not JSON) and one with an
    incarnation that is not a number leave every answer for the good nodes whole."""
    keys = chain(4)
    good = make_node(url, "good", holding(keys))
    with Router(url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("good", 4)])
        r = raw_client(url)
        kind = url.partition(":")[0]  # each record is logged once per process: ids of its own
        forge_holder(r, 9001, f"bad-load-{kind}", "10.0.0.1:1", keys, load="not json")
        forge_holder(r, 9002, f"bad-inc-{kind}", "10.0.0.2:1", keys, inc="x")
        r.close()
        caplog.set_level(logging.WARNING, "kvstore.cluster")
        for _ in range(3):
            assert ranking(router, keys) == [("good", 4)]
            assert ranking(good.index, keys) == [("good", 4)]
            assert [n.node_id for n in router.nodes()] == ["good"]
            assert [n.node_id for n in good.index.nodes()] == ["good"]
        assert router.route(keys).node_id == "good"
    logged = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(logged) == 2 and "bad-load" in logged[0] + logged[1]  # once each


def test_moves_removals_and_clear_reach_the_index(
    server: RedisServer, make_node: Callable[..., Node]
) -> None:
    keys = chain(6)
    node = make_node(server.url, "a", holding(keys[:3]))
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 3)])
        node.store(keys[3:], "disk")
        poll(lambda: ranking(router, keys) == [("a", 6)])
        node.index.moved(keys[:2], "device")
        poll(lambda: router.locate(keys)[0].tiers == {"device": 2, "host": 1, "disk": 3})
        node.index.removed([keys[2]])
        poll(lambda: ranking(router, keys) == [("a", 2)])
        with node.lock:
            node.held.clear()
        node.index.cleared()
        poll(lambda: ranking(router, keys) == [])
        poll(lambda: node.index.stats().republishes == 2)


def test_a_closed_node_leaves_at_once(server: RedisServer, make_node: Callable[..., Node]) -> None:
    keys = chain(2)
    node = make_node(server.url, "a", holding(keys), ttl_s=60.0)
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 2)])
        node.index.close()  # deregisters: no need to wait for the TTL
        assert ranking(router, keys) == []
        assert router.nodes() == []
    raw = redis.Redis.from_url(server.url)  # that locate deleted the dead word it read
    assert raw.get(Layout().block(keys[0])) is None and raw.get(Layout().block(keys[1]))


def test_overflow_drops_the_queue_and_republishes(
    server: RedisServer, make_node: Callable[..., Node]
) -> None:
    keys = chain(50)
    node = make_node(server.url, "a", max_pending=10)
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: node.index.stats().republishes == 1)
        node.store(keys, "host")  # 50 changes > 10: dropped; listing() has them all
        poll(lambda: ranking(router, keys) == [("a", 50)])
        assert node.index.stats().overflows == 1


def test_a_node_that_stops_heartbeating_disappears_within_the_ttl(
    url: str, spawn_node: Callable[..., subprocess.Popen]
) -> None:
    keys = chain(3)
    proc = spawn_node(url, "doomed", 1.0, keys)
    with Router(url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("doomed", 3)])
        proc.kill()  # SIGKILL: no deregistration, no last words
        proc.wait()
        poll(lambda: ranking(router, keys) == [], timeout=3.0)  # TTL 1 s, generous slack
        assert router.nodes() == []


def test_a_restarted_node_counts_only_what_it_republishes(
    url: str, make_node: Callable[..., Node], spawn_node: Callable[..., subprocess.Popen]
) -> None:
    keys = chain(8)
    old = spawn_node(url, "a", 30.0, keys)  # a TTL far longer than the test
    with Router(url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 8)])
        old.kill()
        old.wait()
        node = make_node(url, "a", holding(keys[:4], "disk"), gated=True)
        poll(lambda: node.index.stats().slot is not None)  # registered, not yet re-published
        assert ranking(router, keys) == []  # the old incarnation's 8 entries do not count
        node.gate.set()
        poll(lambda: ranking(router, keys) == [("a", 4)])
        assert router.locate(keys)[0].tiers == {"disk": 4}
        assert router.nodes()[0].incarnation == 2
        raw = raw_client(url)  # the re-publish deleted the old entries of what it still holds
        assert [len(raw.get(Layout().block(k))) for k in keys[:4]] == [4, 4, 4, 4]  # one word
        raw.close()


def test_redis_restarted_empty_every_index_republishes(
    server: RedisServer, make_node: Callable[..., Node]
) -> None:
    keys = chain(12)
    a = make_node(server.url, "a", holding(keys[:8]))
    b = make_node(server.url, "b", holding(keys[:4], "device"))
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 8), ("b", 4)])
        server.kill()
        with pytest.raises(Unavailable):
            router.locate(keys)
        for key in keys[8:]:  # puts go on during the outage: never raise, never wait
            a.store([key], "host")
        poll(lambda: a.index.stats().errors > 0 and b.index.stats().errors > 0)
        assert not a.index.stats().connected
        server.start()  # same port, empty
        poll(lambda: ranking(router, keys) == [("a", 12), ("b", 4)])
        for node in (a, b):
            stats = node.index.stats()
            assert stats.reconnects >= 1 and stats.republishes >= 2 and stats.connected


def test_a_node_never_writes_under_a_slot_redis_handed_to_another(
    server: RedisServer, make_node: Callable[..., Node]
) -> None:
    keys, others = chain(6), chain(2, seed=1)
    a = make_node(server.url, "a", holding(keys[:4]), heartbeat_s=30.0, ttl_s=60.0)
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        poll(lambda: ranking(router, keys) == [("a", 4)])
        slot = a.index.stats().slot
        redis.Redis.from_url(server.url).flushall()  # Redis emptied under a live node
        b = make_node(server.url, "b", holding(others))
        poll(lambda: ranking(router, others) == [("b", 2)])
        assert b.index.stats().slot == slot  # slots start again at 1: b has a's old one
        a.store(keys[4:], "host")  # long before a's next heartbeat
        poll(lambda: ranking(router, keys) == [("a", 6)])
        assert a.index.stats().slot != slot
        assert ranking(router, others) == [("b", 2)]  # nothing of a's landed under b's slot


def test_redis_down_at_start_serves_local_only(
    later: RedisServer, caplog: pytest.LogCaptureFixture, make_node: Callable[..., Node]
) -> None:
    caplog.set_level(logging.INFO, logger="kvstore.cluster")
    srv = later
    keys = chain(4)
    node = make_node(srv.url, "a", holding(keys[:2]))
    node.store(keys[2:], "host")  # neither raises nor waits
    poll(lambda: node.index.stats().errors >= 3)
    assert not node.index.stats().connected
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "local-only" in warnings[0].getMessage()  # once, not per retry
    with Router(srv.url, secret=CLUSTER_SECRET) as router:
        with pytest.raises(Unavailable):
            router.locate(keys)
        srv.start()
        poll(lambda: ranking(router, keys) == [("a", 4)])
    poll(lambda: node.index.stats().connected)
    assert node.index.stats().reconnects == 1
    assert any("is back" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "http://h:1",
        "redis://h:port",
        "redis://h:99999",
        "redis://:1",
        "redis://h:1/db",
        "redis+cluster://h:1/3",
        "unix://",
        "redis://h:1/?socket_timeout=soon",
        6379,
    ],
)
def test_malformed_redis_urls_raise_naming_the_setting(bad: object) -> None:
    with pytest.raises(ValueError, match="redis_url") as err:
        Router(bad, secret=CLUSTER_SECRET)
    assert err.value.field == "redis_url"
    with pytest.raises(ValueError, match="redis_url"):
        ClusterIndex(bad, "a", "a:1", list, secret=SECRET)


def test_bad_input_names_the_field(server: RedisServer, make_node: Callable[..., Node]) -> None:
    keys = chain(3)
    node = make_node(server.url, "a")
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        for bad, field in [([keys[0], keys[1][:15]], "keys[1]"), (["abc"], "keys[0]")]:
            for locate in (router.locate, node.index.locate):
                with pytest.raises(InvalidArgument) as err:
                    locate(bad)
                assert err.value.field == field
        with pytest.raises(InvalidArgument) as err:
            router.locate_tokens([1, 2, 3], block_size=0)
        assert err.value.field == "block_size"
        assert router.locate([]) == []
    for call, field in [
        (lambda: node.index.stored(keys, "gpu"), "tier"),
        (lambda: node.index.moved(keys, None), "tier"),
        (lambda: node.index.removed([b"short"]), "keys[0]"),
        (lambda: Router(server.url, {"gpu": 1.0}, secret=CLUSTER_SECRET), "weights"),
        (lambda: Router(server.url, {"host": -1.0}, secret=CLUSTER_SECRET), "weights"),
        (lambda: Router(server.url, prefix="{kv}", secret=CLUSTER_SECRET), "prefix"),
        (lambda: ClusterIndex(server.url, "", "a:1", list, secret=SECRET), "node_id"),
        (
            lambda: ClusterIndex(
                server.url, "b", "b:1", list, heartbeat_s=2, ttl_s=1, secret=SECRET
            ),
            "ttl_s",
        ),
    ]:
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.field == field
    assert node.index.stats().queued == 0


def raw_client(url: str) -> redis.Redis | RedisCluster:
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url(url.replace("redis+cluster", "redis"))
    return redis.Redis.from_url(url)


def _node_main(url: str, node_id: str, ttl_s: str, *hex_keys: str) -> None:
    held = [(bytes.fromhex(k), "host") for k in hex_keys]
    ttl = float(ttl_s)
    index = ClusterIndex(
        url, node_id, f"{node_id}.grpc:1", lambda: held, heartbeat_s=min(1.0, ttl / 10), ttl_s=ttl,
        secret=SECRET,
    )  # fmt: skip
    poll(lambda: index.stats().republishes >= 1)
    print("ready", flush=True)
    sys.stdin.read()  # until the test kills this process


if __name__ == "__main__":
    _node_main(*sys.argv[1:])
