"""Many nodes, one map: daemons publishing to a real redis-server, Locate and the Router
reading it, through node deaths, restarts and a Redis that goes away."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import msgspec
import numpy as np
import pytest
import zmq
from test_cluster_index import RedisServer, forge_holder, poll, raw_client

from conftest import CLUSTER_SECRET, Daemon, running_daemon
from kvstore.errors import PermissionDenied
from kvstore.keys import block_keys
from kvstore.router import Router

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
MiB = 1 << 20
FAST = ("--heartbeat", "0.2", "--node-ttl", "1.5")


@contextmanager
def node(url: str, name: str, *flags: str) -> Iterator[Daemon]:
    with running_daemon(
        "--host-capacity", "64MiB", "--prefault", "false", "--cluster", url,
        "--node-id", name, *FAST, *flags,
    ) as daemon:  # fmt: skip
        yield daemon


def holdings(locations) -> dict[str, int]:
    return {loc.node_id: loc.matched for loc in locations}


def prompt(salt: bytes, blocks: int) -> list[bytes]:
    return block_keys(np.arange(blocks * 16), 16, salt)


def test_locate_ranks_nodes_by_the_prefix_they_hold(redis_server) -> None:
    keys = prompt(b"ranked", 8)
    with ExitStack() as stack:
        a, b, c = (stack.enter_context(node(redis_server.url, n)) for n in "abc")
        with a.client() as ca, b.client() as cb:
            ca.put(keys, [b"a" * 1000] * 8)
            cb.put(keys[:4], [b"b" * 1000] * 4)
        with Router(redis_server.url, secret=CLUSTER_SECRET) as router, c.client() as cc:
            expected = {"a": 8, "b": 4}  # c holds nothing: left out
            assert poll(lambda: holdings(router.locate(keys)) == expected)
            found = cc.locate(keys)  # any node's Locate answers for the cluster
            assert [loc.node_id for loc in found] == ["a", "b"] and cc.local_only == ""
            assert found[0].tiers == {"host": 8} and found[0].address == a.address
            assert holdings(cc.locate_tokens(np.arange(8 * 16), 16, b"ranked")) == expected


def test_equal_holders_share_the_requests(redis_server) -> None:
    keys = prompt(b"tied", 4)
    with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
        for d in (a, b):
            with d.client() as c:
                c.put(keys, [b"x"] * 4)
        with Router(redis_server.url, seed=7, secret=CLUSTER_SECRET) as router:
            poll(lambda: len(router.locate(keys)) == 2)
            firsts = {router.locate(keys)[0].node_id for _ in range(50)}
    assert firsts == {"a", "b"}


def test_tiers_weigh_as_configured(redis_server, tmp_path) -> None:
    keys = prompt(b"tiers", 4)
    flags = ("--host-capacity", "4MiB", "--disk-dir", str(tmp_path / "disk"))
    with node(redis_server.url, "disky", *flags) as disky, node(redis_server.url, "hosty") as hosty:
        with disky.client() as c:  # the first four go down to disk as later ones arrive
            c.put(keys, [np.full(MiB, i, np.uint8) for i in range(4)])
            c.put(prompt(b"filler", 6), [np.zeros(MiB, np.uint8)] * 6)
            poll(lambda: c.lookup_tiers(keys) == ["disk"] * 4)
        with hosty.client() as c:
            c.put(keys, [np.full(MiB, i, np.uint8) for i in range(4)])
        with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
            found = poll(lambda: (f := router.locate(keys)) and len(f) == 2 and f)
            assert [loc.node_id for loc in found] == ["hosty", "disky"]
            assert found[1].tiers == {"disk": 4}
        with Router(
            redis_server.url, weights={"disk": 1.0, "host": 0.1}, secret=CLUSTER_SECRET
        ) as router:
            assert router.locate(keys)[0].node_id == "disky"


def test_a_killed_node_leaves_every_answer_and_comes_back_with_its_disk(
    redis_server, tmp_path
) -> None:
    keys = prompt(b"killed", 4)
    disk = ("--disk-dir", str(tmp_path / "disk"), "--dirty-ratio", "0")
    with (
        node(redis_server.url, "other") as other,
        Router(redis_server.url, secret=CLUSTER_SECRET) as router,
    ):
        with node(redis_server.url, "victim", *disk) as victim:
            with victim.client() as c:
                # on disk before the kill: a background write may not be, under load
                assert c.put(keys, [b"kept on disk"] * 4, durable=True).stored == 4
            assert poll(lambda: holdings(router.locate(keys)) == {"victim": 4})
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            # gone from the answers within the TTL, with no one sweeping the key space
            assert poll(lambda: router.locate(keys) == [], timeout=5)
            with other.client() as c:
                assert c.locate(keys) == []
        with node(redis_server.url, "", *disk) as again:  # same disk dir: the same node id
            assert poll(lambda: holdings(router.locate(keys)) == {"victim": 4})
            assert router.locate(keys)[0].tiers == {"disk": 4}
            assert again.process.poll() is None


def test_a_redis_that_restarts_empty_is_filled_again(redis_server) -> None:
    keys = prompt(b"redis-restart", 6)
    with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
        for d, n in ((a, 6), (b, 3)):
            with d.client() as c:
                c.put(keys[:n], [b"x" * 100] * n)
        with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
            assert poll(lambda: holdings(router.locate(keys)) == {"a": 6, "b": 3})
            redis_server.kill()
            with a.client() as c:  # Redis away: puts and gets go on, Locate is local
                more = prompt(b"during-outage", 2)
                assert c.put(more, [b"y", b"z"]).stored == 2
                assert [bytes(g) for g in c.get(more)] == [b"y", b"z"]
                assert holdings(c.locate(keys)) == {"a": 6} and "unreachable" in c.local_only
            redis_server.start()  # empty, on the same port
            assert poll(lambda: holdings(router.locate(keys)) == {"a": 6, "b": 3})
            assert holdings(router.locate(more)) == {"a": 2}  # published once Redis was back


def test_a_node_starts_with_redis_down_and_joins_when_it_answers(tmp_path) -> None:
    redis_server = RedisServer(tmp_path / "late")
    keys = prompt(b"late", 2)
    try:
        with node(redis_server.url, "early") as early, early.client() as c:
            assert c.put(keys, [b"a", b"b"]).stored == 2  # serves local-only meanwhile
            assert holdings(c.locate(keys)) == {"early": 2} and c.local_only
            redis_server.start()
            with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
                assert poll(lambda: holdings(router.locate(keys)) == {"early": 2})
    finally:
        redis_server.stop()


def test_a_malformed_cluster_url_is_a_start_up_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.server", "--address", "127.0.0.1:0",
         "--cluster", "http://nowhere", "--cluster-secret", CLUSTER_SECRET],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "cluster:" in result.stderr


def test_without_a_cluster_locate_answers_for_this_node(daemon, salt) -> None:
    keys = prompt(salt, 3)
    with daemon.client() as c:
        c.put(keys[:2], [b"1", b"2"])
        found = c.locate(keys)
        assert holdings(found) == {found[0].node_id: 2} and "without --cluster" in c.local_only


def test_with_a_cluster_only_registered_nodes_are_pushed_to(redis_server) -> None:
    keys = prompt(b"push", 1)
    with (
        node(redis_server.url, "src", "--push-allow", "10.0.0.0/8") as src,
        node(redis_server.url, "dst") as dst,
        running_daemon("--host-capacity", "4MiB") as outsider,
        src.client() as c,
    ):
        c.put(keys, [b"pushed"])
        with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
            poll(lambda: {n.node_id for n in router.nodes()} >= {"src", "dst"})
        assert c.push(keys, dst.address).stored == 1  # registered: allowed
        with pytest.raises(PermissionDenied, match="neither a node of this cluster nor in"):
            c.push(keys, outsider.address)


def test_records_that_do_not_decode_leave_the_cluster_answering(redis_server) -> None:
    """A signed record whose `load` is not JSON, and one whose incarnation is not a number,
    both holding the prompt: Locate, the router, fetch-through and Push answer as if
    they were not there."""
    keys = prompt(b"bad records", 4)
    with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
        with a.client() as ca:
            ca.put(keys, [b"a" * 1000] * 4)
        with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
            poll(lambda: holdings(router.locate(keys)) == {"a": 4})
            poll(lambda: {n.node_id for n in router.nodes()} == {"a", "b"})
            r = raw_client(redis_server.url)
            forge_holder(r, 9001, "bad-load", "127.0.0.1:9", keys, load="not json")
            forge_holder(r, 9002, "bad-inc", "127.0.0.1:9", keys, inc="x")
            r.close()
            assert holdings(router.locate(keys)) == {"a": 4}
            assert {n.node_id for n in router.nodes()} == {"a", "b"}
            assert router.route(keys).node_id == "a"
        with b.client() as cb, a.client() as ca:
            assert holdings(cb.locate(keys)) == {"a": 4} and cb.local_only == ""
            assert len(cb.get(keys, fetch=True)) == 4  # fetched from a
            assert cb.stats().fetched_blocks == {"a": 4}
            assert ca.push(keys, b.address).found == 4  # b is still known as a node


# -- KV events ------------------------------------------------------------------------
# Written from vLLM 0.32.0's published schema (vllm/distributed/kv_events.py), apart from
# kvstore's own definitions, so that a test decodes what a vLLM-aware router would.


class _Event(msgspec.Struct, tag=True, omit_defaults=True):
    pass


class BlockStored(_Event):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[bytes | int]
    medium: str | None


class AllBlocksCleared(_Event):
    pass


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_events_are_published_as_vllm_does_and_replayed(tmp_path) -> None:
    pub, replay = free_port(), free_port()
    keys = prompt(b"events", 3)
    flags = (
        "--events-address", f"tcp://*:{pub}",  # "*": bind, as vLLM does
        "--events-replay", f"tcp://127.0.0.1:{replay}", "--events-topic", "kv@n1@m",
    )  # fmt: skip
    with running_daemon("--host-capacity", "8MiB", *flags) as d, d.client() as c:
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.connect(f"tcp://127.0.0.1:{pub}")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        probe = prompt(b"probe", 1)
        while not sub.poll(100):  # a slow joiner: send until our subscription is in place
            c.put(probe, [b"p"])
            c.delete(probe)
        sub.recv_multipart()
        c.put(keys, [b"a", b"b", b"c"])
        c.delete(keys[2:])
        seen: list[tuple[int, object]] = []
        while not any(isinstance(e, BlockRemoved) and keys[2] in e.block_hashes for _, e in seen):
            assert sub.poll(10_000), "no event within 10 s"
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv@n1@m" and len(seq) == 8
            batch = msgspec.msgpack.decode(payload, type=EventBatch)
            seen += [(int.from_bytes(seq, "big"), e) for e in batch.events]
        stored = [e for _, e in seen if isinstance(e, BlockStored)]
        assert [h for e in stored for h in e.block_hashes if h in keys] == keys  # in order
        assert all(e.medium == "CPU" and e.token_ids == [] for e in stored)
        assert all(e.parent_block_hash is None and e.lora_id is None for e in stored)
        removed = next(e for _, e in seen if isinstance(e, BlockRemoved))
        assert removed.medium == "CPU"

        # a subscriber that missed everything asks the replay socket from the start
        req = ctx.socket(zmq.DEALER)
        req.connect(f"tcp://127.0.0.1:{replay}")
        req.send_multipart([b"", (0).to_bytes(8, "big")])
        sequences, events = [], []
        while True:
            assert req.poll(10_000)
            frames = req.recv_multipart()
            seq = int.from_bytes(frames[-2], "big", signed=True)
            if seq == -1:
                break
            sequences.append(seq)
            events += msgspec.msgpack.decode(frames[-1], type=EventBatch).events
        assert sequences == list(range(len(sequences)))  # from 0, no gaps
        assert isinstance(events[0], AllBlocksCleared)  # a new run says so first
        replayed = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
        assert all(k in replayed for k in keys)

        # and the same batches through gRPC Watch
        watched = []
        for batch in c.watch(0):
            watched.append(batch.sequence)
            if batch.sequence == sequences[-1]:
                break
        assert watched == sequences
        sub.close()
        req.close()


def test_watch_follows_live_changes_without_gaps(daemon, salt) -> None:
    keys = prompt(salt, 40)
    with daemon.client() as c:
        stream = c.watch()  # from now on
        got: list[int] = []
        done = threading.Event()

        def follow() -> None:
            for batch in stream:
                got.append(batch.sequence)
                if any(
                    type(e).__name__ == "BlockStored" and keys[-1] in e.block_hashes
                    for e in batch.events
                ):
                    done.set()
                    return

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        for i in range(0, 40, 4):
            c.put(keys[i : i + 4], [b"w"] * 4)
        assert done.wait(30)
        assert got == list(range(got[0], got[0] + len(got)))  # gap-free
