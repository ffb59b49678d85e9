"""A worker talks to its own node only: that node fetches what other nodes hold, and waits
for what a producer is still writing."""

from __future__ import annotations

import selectors
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from test_cluster_index import forge_holder, poll
from test_metrics import scrape

from conftest import (
    CLUSTER_SECRET,
    Daemon,
    raw_channel,
    read_answer,
    running_daemon,
    send_request,
)
from kvstore.client import Client
from kvstore.cluster import Load
from kvstore.cluster.scoring import Location
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import PUT, READY
from kvstore.router import Router
from kvstore.server import fetch
from kvstore.store import Store
from kvstore.tiers.host import HostTier

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
MiB = 1 << 20
FAST = ("--heartbeat", "0.2", "--node-ttl", "1.5")


@contextmanager
def node(url: str, name: str, *flags: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    with running_daemon(
        "--host-capacity", "64MiB", "--prefault", "false", "--cluster", url,
        "--node-id", name, *FAST, *flags, env=env,
    ) as daemon:  # fmt: skip
        yield daemon


def blocks(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, np.uint8) for _ in range(n)]


def published(url: str, keys: list[bytes], holders: dict[str, int]) -> None:
    with Router(url, secret=CLUSTER_SECRET) as router:
        poll(lambda: {loc.node_id: loc.matched for loc in router.locate(keys)} == holders)


def test_a_decode_node_gets_a_prompt_held_by_two_others(redis_server, tmp_path) -> None:
    """Blocks 0-5 on A (0-3 only on A's disk by now), 6-9 on C: B serves all ten."""
    keys = block_keys(np.arange(10 * 16), 16, b"split")
    payloads = blocks(10, MiB, 1)
    disk = ("--host-capacity", "6MiB", "--disk-dir", str(tmp_path / "a"), "--dirty-ratio", "0")
    with ExitStack() as stack:
        a = stack.enter_context(node(redis_server.url, "a", *disk))
        b = stack.enter_context(node(redis_server.url, "b"))
        c = stack.enter_context(node(redis_server.url, "c"))
        with a.client() as ca:
            ca.put(keys[:6], payloads[:6])
            ca.put(block_keys(np.arange(64), 16, b"pressure"), blocks(4, MiB, 2))
            poll(lambda: ca.lookup_tiers(keys[:6])[:4] == ["disk"] * 4)
        with c.client() as cc:  # C holds the rest of the chain (its prefix evicted, say)
            cc.put(keys[6:], payloads[6:])
        published(redis_server.url, keys, {"a": 6})
        published(redis_server.url, keys[6:], {"c": 4})
        with b.client() as cb:
            assert cb.lookup(keys) == 0
            got = cb.get(keys, fetch=True)
            assert len(got) == 10
            assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))
            assert cb.lookup_tiers(keys) == ["host"] * 10  # kept here for the next request
            stats = cb.stats()
            assert stats.fetched_blocks == {"a": 6, "c": 4}
            assert stats.fetched_bytes["a"] == 6 * MiB


def test_two_concurrent_gets_of_a_missing_run_fetch_it_once(redis_server) -> None:
    keys = block_keys(np.arange(32 * 16), 16, b"once")
    payloads = blocks(32, 256 << 10, 3)
    with node(redis_server.url, "holder") as holder, node(redis_server.url, "reader") as reader:
        with holder.client() as c:
            c.put(keys, payloads)
        published(redis_server.url, keys, {"holder": 32})
        results: list[int] = []

        def get() -> None:
            with reader.client() as c:
                results.append(len(c.get(keys, fetch=True)))

        readers = [threading.Thread(target=get) for _ in range(2)]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join()
        with reader.client() as c:
            assert results == [32, 32] and c.stats().fetched_blocks == {"holder": 32}


def test_prefetch_warms_the_node_and_returns_at_once(redis_server) -> None:
    keys = block_keys(np.arange(8 * 16), 16, b"prefetch")
    with node(redis_server.url, "holder") as holder, node(redis_server.url, "warm") as warm:
        with holder.client() as c:
            c.put(keys, blocks(8, MiB, 4))
        published(redis_server.url, keys, {"holder": 8})
        with warm.client() as c:
            assert c.prefetch(keys) == 0  # held nothing when asked
            assert c.lookup(keys, wait=30) == 8  # arrives in the background
            assert c.stats().fetched_blocks == {"holder": 8}


def test_a_holder_killed_during_a_fetch_leaves_whole_blocks_only(redis_server) -> None:
    """The holder dies while serving a long run: the reader keeps the blocks that arrived
    whole and takes the rest from the other holder; every byte is right."""
    keys = block_keys(np.arange(48 * 16), 16, b"dies")
    payloads = blocks(48, MiB, 5)
    with ExitStack() as stack:
        dying = stack.enter_context(node(redis_server.url, "dying", "--host-capacity", "96MiB"))
        backup = stack.enter_context(node(redis_server.url, "backup"))
        reader = stack.enter_context(node(redis_server.url, "reader"))
        with dying.client() as c:
            c.put(keys, payloads)
        with backup.client() as c:
            c.put(keys[:24], payloads[:24])
        published(redis_server.url, keys, {"dying": 48, "backup": 24})
        with reader.client() as c:
            getting = threading.Thread(target=lambda: got.extend(c.get(keys, fetch=True)))
            got: list[np.ndarray] = []
            getting.start()
            poll(lambda: sum(c.stats().fetched_blocks.values()) > 0)  # under way
            dying.process.send_signal(signal.SIGKILL)
            getting.join(timeout=120)
            assert not getting.is_alive()
            assert len(got) >= 24  # at least what the other holder has
            assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=False))
            held = c.get(keys)
            assert all(np.array_equal(g, p) for g, p in zip(held, payloads, strict=False))


@contextmanager
def dead_holders(n: int) -> Iterator[tuple[list[str], list[int]]]:
    """`n` addresses on loopback that accept a connection and close it at once (holders
    that are gone, whose dials a test counts): the addresses, and which one each dial was
    to, in order."""
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=64) for _ in range(n)]
    dialed: list[int] = []
    stop = threading.Event()
    with selectors.DefaultSelector() as ready:
        for i, listener in enumerate(listeners):
            listener.setblocking(False)
            ready.register(listener, selectors.EVENT_READ, i)

        def serve() -> None:
            while not stop.is_set():
                for key, _ in ready.select(0.05):
                    try:
                        key.fileobj.accept()[0].close()  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    dialed.append(key.data)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield [f"127.0.0.1:{s.getsockname()[1]}" for s in listeners], dialed
        finally:
            stop.set()
            thread.join()
            for listener in listeners:
                listener.close()


def settled(dialed: list[int]) -> int:
    """How many dials so far, once the listeners have taken the last ones in."""
    time.sleep(0.5)
    return len(dialed)


def test_sixty_dead_holders_cost_a_fetch_a_few_dials(redis_server) -> None:
    """60 holders indexed for a prompt are all gone: a get with fetch dials a few of them
    (not 60 one after another) and answers with nothing, well within its deadline; the
    next request passes over those that just failed."""
    keys = block_keys(np.arange(4 * 16), 16, b"dead holders")
    with node(redis_server.url, "reader") as reader, dead_holders(60) as (addresses, dialed):
        r = redis.Redis(port=redis_server.port)
        for i, address in enumerate(addresses):
            forge_holder(r, 5000 + i, f"dead-{i}", address, keys)
        r.close()
        with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
            assert len(router.locate(keys)) == 60
        earlier: set[int] = set()
        for transport in ("grpc", "auto"):  # the gRPC path, and the data plane's
            before = settled(dialed)
            with reader.client(transport=transport, timeout=20) as c:
                assert c.get(keys, fetch=True) == []
            tried = set(dialed[before : settled(dialed)])
            assert 1 <= len(tried) <= fetch.MAX_HOLDERS, (transport, len(tried))
            assert not tried & earlier  # those that just failed are passed over
            earlier |= tried


def test_a_node_keeps_few_clients_of_holders_and_passes_over_failed_ones(monkeypatch) -> None:
    store = Store([HostTier(16 * MiB, prefault=False)], max_block_size=MiB, reserve_timeout=1)
    membership = SimpleNamespace(index=None, node_id="me")
    fetcher = fetch.Fetcher(store, membership, 5.0)  # type: ignore[arg-type]
    keys = block_keys(np.arange(2 * 16), 16, b"few clients")
    try:
        with dead_holders(40) as (addresses, dialed):
            for address in addresses:  # fetches from 40 holders, one after another
                with fetcher._peer(address):
                    assert fetcher.peer_count() <= fetch.MAX_PEERS
            assert fetcher.peer_count() == fetch.MAX_PEERS  # the least recently used closed
            monkeypatch.setattr(fetch, "PEER_IDLE", 0.0)
            time.sleep(0.01)
            with fetcher._peer(addresses[0]):
                assert fetcher.peer_count() == 1  # the idle ones closed
            holders = [
                Location(f"h{i}", a, a, 2, {"host": 2}, Load()) for i, a in enumerate(addresses)
            ]
            membership.index = SimpleNamespace(locate=lambda keys: holders)
            assert fetcher.fill(keys) == 0
            n = settled(dialed)
            first = set(dialed[:n])
            assert 1 <= len(first) <= fetch.MAX_HOLDERS
            assert fetcher.fill(keys) == 0
            second = set(dialed[n : settled(dialed)])  # those that just failed: passed over
            assert 1 <= len(second) <= fetch.MAX_HOLDERS and not second & first
            assert fetcher.peer_count() <= 1  # clients of holders that failed are dropped
    finally:
        fetcher.close()
        store.close()


def test_a_consumer_waits_for_a_producer_still_writing(daemon, salt) -> None:
    """The decode asks first; the prefill writes afterwards, batch by batch. The decode
    gets every block, as it appears, and never a partial one."""
    keys = block_keys(np.arange(24 * 16), 16, salt)
    payloads = blocks(24, MiB, 6)
    got: list[np.ndarray] = []
    with daemon.client() as consumer, daemon.client() as producer:
        waiting = threading.Thread(target=lambda: got.extend(consumer.get(keys, wait=60)))
        waiting.start()
        for i in range(0, 24, 4):
            producer.put(keys[i : i + 4], payloads[i : i + 4])
        waiting.join(timeout=120)
    assert len(got) == 24
    assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))


def test_a_consumer_of_a_producer_killed_mid_put_returns_with_what_exists() -> None:
    keys = block_keys(np.arange(4 * 16), 16, b"killed-producer")
    with running_daemon("--host-capacity", "64MiB", "--data-timeout", "30") as d:
        producer = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import socket, sys
                sys.path.insert(0, {str(Path(__file__).parent)!r})
                from conftest import raw_channel, send_request
                from kvstore.proto import kvstore_pb2 as pb
                from kvstore.proto.channel import PUT, INLINE
                keys = {keys!r}
                blocks = pb.BlockHeaders(blocks=[
                    pb.BlockHeader(key=k, meta=pb.BlockMeta(size=1 << 20)) for k in keys])
                with raw_channel({d.address!r}) as sock:
                    meta = blocks.SerializeToString()
                    from kvstore.proto.channel import REQUEST_MAGIC, encode
                    sock.sendall(encode(REQUEST_MAGIC, PUT, INLINE, meta, 4 << 20))
                    sock.sendall(b"x" * (3 << 20))  # three whole blocks, then dies
                    print("sent", flush=True)
                    sys.stdin.read()
            """)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert producer.stdout.readline().strip() == "sent"
            with d.client() as consumer:
                poll(lambda: consumer.lookup(keys) == 3)
                waiting = threading.Thread(target=lambda: got.extend(consumer.get(keys, wait=60)))
                got: list[np.ndarray] = []
                waiting.start()
                producer.send_signal(signal.SIGKILL)  # the put will not deliver the rest
                waiting.join(timeout=30)  # well before the 60 s bound: the put's end says so
                assert not waiting.is_alive()
                assert [bytes(g) for g in got] == [b"x" * MiB] * 3
        finally:
            producer.kill()
            producer.wait()


@contextmanager
def metered() -> Iterator[Daemon]:
    """A node of its own whose transfers in flight (`in_flight`) a test can watch."""
    with running_daemon("--host-capacity", "64MiB", "--metrics-address", "127.0.0.1:0") as d:
        yield d


def in_flight(d: Daemon) -> int:
    """Gets and puts the node is running now (a get waiting for blocks is one)."""
    return int(scrape(d)["kvstore_inflight_transfers", ()])


@contextmanager
def producer(d: Daemon, keys: list[bytes]) -> Iterator[socket.socket]:
    """A put of one 1 MiB block per key, declared (the node answered READY: it knows them
    coming); the test sends its bytes. Leaving drops the connection: a producer that died."""
    headers = [pb.BlockHeader(key=k, meta=pb.BlockMeta(size=MiB)) for k in keys]
    with raw_channel(d.address) as sock:
        send_request(sock, PUT, pb.BlockHeaders(blocks=headers))
        assert read_answer(sock).flags & READY
        yield sock


def waiting_get(client: Client, keys: list[bytes]) -> tuple[threading.Thread, list[np.ndarray]]:
    """`client.get(keys, wait=60)`, started in a thread."""
    got: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: got.extend(client.get(keys, wait=60)), daemon=True)
    thread.start()
    return thread, got


def test_a_consumer_arriving_after_its_producer_died_returns_with_what_exists() -> None:
    """The prefill's put died (its connection dropped) before the decode asked: the wait
    ends at once with the blocks that arrived whole, not after its 60 s bound."""
    keys = block_keys(np.arange(4 * 16), 16, b"died-before")
    with metered() as d, d.client() as consumer:
        with producer(d, keys) as sock:
            sock.sendall(b"x" * (3 * MiB))  # three whole blocks of four, then it dies
            poll(lambda: consumer.lookup(keys) == 3)
        poll(lambda: in_flight(d) == 0)  # the node saw it die: its put ended
        waiting, got = waiting_get(consumer, keys)
        waiting.join(timeout=30)  # well before the bound
        assert not waiting.is_alive()
        assert [bytes(g) for g in got] == [b"x" * MiB] * 3


def test_a_new_put_after_a_dead_one_is_waited_for() -> None:
    """A put that died is remembered only until a put of the same keys starts: a wait that
    begins during the new put waits for it, and gets every block."""
    keys = block_keys(np.arange(2 * 16), 16, b"put-again")
    with metered() as d, d.client() as consumer:
        with producer(d, keys):
            pass  # died before sending a byte
        poll(lambda: in_flight(d) == 0)
        waiting, got = waiting_get(consumer, keys)
        waiting.join(timeout=30)  # nothing is coming: at once
        assert not waiting.is_alive() and got == []
        with producer(d, keys) as sock:  # the prefill again, declared: on its way
            waiting, got = waiting_get(consumer, keys)
            poll(lambda: in_flight(d) == 2)  # the put, and the get waiting for keys[0]
            sock.sendall(b"y" * (2 * MiB))
            assert pb.PutReply.FromString(read_answer(sock).meta).stored == 2
            waiting.join(timeout=30)
        assert not waiting.is_alive()
        assert [bytes(g) for g in got] == [b"y" * MiB] * 2


def test_a_consumer_arriving_before_any_producer_waits_for_it() -> None:
    keys = block_keys(np.arange(2 * 16), 16, b"before-any")
    with metered() as d, d.client() as consumer, d.client() as prefill:
        waiting, got = waiting_get(consumer, keys)
        poll(lambda: in_flight(d) == 1)  # waiting, with no put known
        prefill.put(keys, [b"z" * MiB] * 2)
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        assert [bytes(g) for g in got] == [b"z" * MiB] * 2


def test_without_a_cluster_fetch_is_nothing_and_wait_works_here(daemon, salt) -> None:
    keys = block_keys(np.arange(4 * 16), 16, salt)
    with daemon.client() as c:
        assert c.get(keys, fetch=True) == []
        assert c.lookup(keys, wait=0.2) == 0  # nothing is coming: the bound passes
        c.put(keys[:2], [b"a", b"b"])
        assert c.lookup(keys, fetch=True) == 2
