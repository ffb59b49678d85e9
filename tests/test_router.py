"""Router.route against a real redis-server and real ClusterIndex instances (fake nodes
that hold what the test says): where requests go, and that the load term spreads them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_cluster_index import Node, RedisServer, chain, poll

from conftest import CLUSTER_SECRET
from kvstore.cluster import Load, NodeUsage
from kvstore.cluster.scoring import BALANCE, SentWork
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.keys import block_keys
from kvstore.router import Route, Router

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
def nodes(server: RedisServer) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(node_id: str, held: dict[bytes, str] | None = None, **kw: object) -> Node:
        made.append(Node(server.url, node_id, held, **kw))
        return made[-1]

    yield make
    for node in made:
        node.index.close()


def holding(keys: list[bytes], tier: str = "host") -> dict[bytes, str]:
    return dict.fromkeys(keys, tier)


def registered(router: Router, count: int) -> None:
    poll(lambda: len(router.nodes()) == count)


def test_routes_to_the_longest_prefix_and_ranks_every_live_node(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    keys = chain(8)
    nodes("a", holding(keys))
    nodes("b", holding(keys[:4]))
    nodes("c")  # holds nothing: still a candidate
    with Router(server.url, seed=1, secret=CLUSTER_SECRET) as router:
        registered(router, 3)
        poll(lambda: [loc.matched for loc in router.locate(keys)] == [8, 4])
        route = router.route(keys)
        assert (route.node_id, route.matched, route.blocks) == ("a", 8, 8)
        assert route.address == "a.grpc:1" and route.location.tiers == {"host": 8}
        assert [(loc.node_id, loc.matched) for loc in route.ranked] == [
            ("a", 8),
            ("b", 4),
            ("c", 0),
        ]
        assert route.ranked[0].score == pytest.approx(-(8 - 0.8 * 8))  # cost: blocks not saved
        assert router.sent_work() == {"a": 0}  # all eight held: no prefill sent
        other = router.route(chain(5, seed=3))  # held nowhere: the least loaded node
        assert other.matched == 0 and router.sent_work()[other.node_id] == 5


def test_work_sent_spreads_requests_that_match_nowhere(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    for name in "abc":
        nodes(name)
    with Router(server.url, seed=2, secret=CLUSTER_SECRET) as router:
        registered(router, 3)
        firsts = [router.route(chain(20, seed=10 + i)).node_id for i in range(6)]
        assert sorted(firsts[:3]) == ["a", "b", "c"] and firsts[3:] == firsts[:3]
        work = router.sent_work()
        assert max(work.values()) < 20 * 2 and min(work.values()) > 20


def test_ties_spread_at_random_and_the_seed_repeats_them(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    keys = chain(4)
    for name in "abcd":
        nodes(name, holding(keys))
    firsts = []
    for seed in range(8):
        with Router(server.url, seed=seed, secret=CLUSTER_SECRET) as router:
            registered(router, 4)
            poll(lambda r=router: len(r.locate(keys)) == 4)
            firsts.append(router.route(keys).node_id)
    assert len(set(firsts)) > 1
    with Router(server.url, seed=5, secret=CLUSTER_SECRET) as again:
        assert again.route(keys).node_id == firsts[5]


def test_tiers_and_heartbeat_load_weigh_in(server: RedisServer, nodes: Callable[..., Node]) -> None:
    keys = chain(6)
    nodes("disk", holding(keys, "disk"))
    nodes("host", holding(keys, "host"))
    busy = NodeUsage(load=Load(inflight=40))
    nodes("busy-device", holding(keys, "device"), usage=lambda: busy)
    with Router(server.url, seed=0, secret=CLUSTER_SECRET) as router:
        registered(router, 3)
        poll(lambda: len(router.locate(keys)) == 3)
        route = router.route(keys)
        assert route.node_id == "host"  # device saves 1.2 blocks more; 40 in flight cost 4
        costs = {loc.node_id: -loc.score for loc in route.ranked}
        assert costs == pytest.approx({"host": 1.2, "disk": 3.0, "busy-device": 4.0})


def stored(router: Router, node_id: str, node: Node, keys: list[bytes]) -> None:
    """Store `keys` on `node` and wait until the index says so (what a put's publish does)."""
    node.store(keys, "host")
    poll(
        lambda: (node_id, len(keys)) in [(loc.node_id, loc.matched) for loc in router.locate(keys)]
    )


def replay(
    router: Router, by_id: dict[str, Node], prompts: list[list[bytes]]
) -> tuple[list[str], list[int]]:
    """Route each prompt, count its prefill work where it went, store it there."""
    went, work = [], []
    for keys in prompts:
        route = router.route(keys)
        went.append(route.node_id)
        work.append(len(keys) - route.matched)
        stored(router, route.node_id, by_id[route.node_id], keys)
    return went, work


def spread(went: list[str], work: list[int], names: str) -> float:
    per = {n: 0 for n in names}
    for n, w in zip(went, work, strict=True):
        per[n] += w
    return max(per.values()) / (sum(per.values()) / len(per))


@pytest.mark.parametrize("policy", ["cost", "prefix"])
def test_a_prefix_every_request_shares_does_not_pull_all_traffic_to_one_node(
    server: RedisServer, nodes: Callable[..., Node], policy: str
) -> None:
    """Every prompt: one shared system-prompt block, then three of its own."""
    rng = np.random.default_rng(7)
    prompts = [
        block_keys(np.concatenate([np.arange(16), rng.integers(0, 9999, 48)]), 16)
        for _ in range(60)
    ]
    by_id = {name: nodes(name) for name in "abcd"}
    with Router(server.url, seed=3, policy=policy, secret=CLUSTER_SECRET) as router:
        registered(router, 4)
        went, work = replay(router, by_id, prompts)
    if policy == "prefix":  # the first node to hold the shared block takes everything
        assert len(set(went[1:])) == 1 and spread(went, work, "abcd") == 4.0
    else:
        assert set(went) == set("abcd") and spread(went, work, "abcd") <= 1.1


def test_a_growing_conversation_stays_where_its_prefix_is(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    tokens = np.random.default_rng(1).integers(0, 9999, 16 * 40)
    turns = [block_keys(tokens[: 16 * n], 16) for n in (8, 16, 24, 32, 40)]
    others = [chain(8, seed=100 + i) for i in range(6)]
    by_id = {name: nodes(name) for name in "ab"}
    with Router(server.url, seed=0, secret=CLUSTER_SECRET) as router:
        registered(router, 2)
        went, _ = replay(router, by_id, [turns[0], *others[:3], turns[1], *others[3:], *turns[2:]])
    conversation = [went[0], went[4], *went[-3:]]
    assert len(set(conversation)) == 1  # each turn saves more than any load gap costs


def test_a_failed_node_gets_nothing_until_it_registers_again(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    keys = chain(6)
    a = nodes("a", holding(keys))
    nodes("b")
    with Router(server.url, seed=0, nodes_ttl_s=0, secret=CLUSTER_SECRET) as router:
        registered(router, 2)
        poll(lambda: len(router.locate(keys)) == 1)
        assert router.route(keys).node_id == "a"
        assert router.route(keys, exclude={"a"}).node_id == "b"
        router.failed("a")
        assert {router.route(keys).node_id for _ in range(5)} == {"b"}
        a.index.close()
        nodes("a", holding(keys))  # restarted: a new incarnation
        poll(lambda: router.route(keys).node_id == "a")
        with pytest.raises(Unavailable):
            router.route(keys, exclude={"a", "b"})


def test_served_corrects_the_work_charged(server: RedisServer, nodes: Callable[..., Node]) -> None:
    keys = chain(10)
    nodes("a", holding(keys[:6]))
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        registered(router, 1)
        poll(lambda: len(router.locate(keys)) == 1)
        route = router.route(keys)
        assert router.sent_work() == {"a": 4}
        router.served(route, 2)  # the index lagged: only two were really there
        assert router.sent_work() == {"a": 8}
        router.served(Route(route.location, route.ranked, 10), 10)  # fetched the rest
        assert router.sent_work() == {"a": 4}


def test_route_tokens_counts_a_partial_last_block(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    tokens = np.arange(16 * 3 + 5)
    keys = block_keys(tokens, 16, b"m")
    nodes("a", holding(keys))
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        registered(router, 1)
        poll(lambda: len(router.locate(keys)) == 1)
        route = router.route_tokens(tokens, 16, b"m")
        assert (route.matched, route.blocks) == (3, 4) and router.sent_work() == {"a": 1}


def test_bad_input_and_an_unreachable_index(tmp_path: Path, server: RedisServer) -> None:
    for kw, field in [
        ({"policy": "best"}, "policy"),
        ({"balance": -1}, "balance"),
        ({"half_life": 0}, "half_life"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            Router(server.url, **kw, secret=CLUSTER_SECRET)
        assert err.value.field == field
    with Router(server.url, secret=CLUSTER_SECRET) as router:
        with pytest.raises(InvalidArgument) as err:
            router.route(chain(3), blocks=2)
        assert err.value.field == "blocks"
        with pytest.raises(Unavailable, match="no live node"):
            router.route(chain(3))
    down = RedisServer(tmp_path / "down")
    with Router(down.url, secret=CLUSTER_SECRET) as router, pytest.raises(Unavailable):
        router.route(chain(3))


def test_sent_work_decays_per_routed_request() -> None:
    sent = SentWork(half_life=2)
    sent.routed("a", 8)
    sent.routed("b", 0)
    sent.routed("b", 0)
    assert sent["a"] == pytest.approx(4) and sent["b"] == 0 and sent["c"] == 0
    sent.correct("a", -10)
    assert sent["a"] == 0
    assert 0 < BALANCE < 1


def test_routing_goes_on_by_load_while_redis_is_away(
    server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """A stopped or emptied Redis does not stop requests: the router keeps the nodes it last
    read and chooses by load alone, saying so, until Redis and the nodes' records are back."""
    keys = chain(6)
    nodes("a", holding(keys))
    nodes("b")
    with Router(server.url, seed=0, nodes_ttl_s=0, secret=CLUSTER_SECRET) as router:
        registered(router, 2)
        poll(lambda: len(router.locate(keys)) == 1)
        assert router.route(keys).indexed
        server.kill()
        away = [router.route(keys) for _ in range(4)]
        assert not any(r.indexed for r in away) and {r.matched for r in away} == {0}
        assert {r.node_id for r in away} == {"a", "b"}  # load alone spreads them
        server.start()  # empty: until the nodes register again, the last list still routes
        assert router.route(keys).node_id in {"a", "b"}
        poll(lambda: (r := router.route(keys)).indexed and r.node_id == "a" and r.matched == 6)
    with Router(server.url, secret=CLUSTER_SECRET) as fresh:
        server.kill()  # nothing read yet: nothing to route by
        with pytest.raises(Unavailable, match="cluster index"):
            fresh.route(keys)
