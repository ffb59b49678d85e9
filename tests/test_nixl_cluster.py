"""Node to node over NIXL: fetch-through, prefetch and push move blocks between two nodes'
arenas through NIXL where both nodes run it, and over the TCP data plane where one does
not; only nodes that proved the cluster's secret get a session, and lose it with it."""

from __future__ import annotations

import os
import shutil
import signal

import grpc
import numpy as np
import pytest
from test_cluster_index import poll
from test_fetch import blocks, node, published
from test_metrics import scrape
from test_trust import _prove, _wait_log

from conftest import NIXL, SERVICE, hello, secret_file
from kvstore.errors import PermissionDenied, Unavailable
from kvstore.keys import block_keys
from kvstore.trust import ClusterSecret

pytestmark = [
    NIXL,
    pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server"),
]
MiB = 1 << 20
METRICS = ("--metrics-address", "127.0.0.1:0")


def prompt(name: bytes, n: int) -> list[bytes]:
    return block_keys(np.arange(n * 16), 16, name)


def same(got: list[np.ndarray], payloads: list[np.ndarray]) -> bool:
    return len(got) == len(payloads) and all(
        np.array_equal(g, p) for g, p in zip(got, payloads, strict=True)
    )


def test_fetch_through_and_prefetch_move_blocks_over_nixl(redis_server) -> None:
    keys, later = prompt(b"nixl fetch", 6), prompt(b"nixl prefetch", 3)
    payloads = [*blocks(5, MiB, 10), *blocks(1, 20 << 10, 11)]  # one small: on the socket
    with node(redis_server.url, "holder") as holder, node(redis_server.url, "reader") as reader:
        assert hello(holder.address).nixl and hello(reader.address).nixl
        with holder.client() as c:
            c.put(keys, payloads)
            c.put(later, blocks(3, 512 << 10, 12))
        published(redis_server.url, keys, {"holder": 6})
        published(redis_server.url, later, {"holder": 3})
        with reader.client() as c:
            assert same(c.get(keys, fetch=True), payloads)
            assert c.lookup_tiers(keys) == ["host"] * 6  # in the reader's own arena now
            assert c.prefetch(later) == 0
            poll(lambda: c.lookup(later) == 3)
            assert c.stats().fetched_blocks == {"holder": 9}
        with holder.client() as c:
            transfers = c.stats().transfers
            assert transfers.get("get/nixl", 0) >= 2 and "get/tcp" not in transfers


def test_push_moves_blocks_over_nixl(redis_server) -> None:
    keys = prompt(b"nixl push", 4)
    payloads = blocks(4, MiB, 13)
    with (
        node(redis_server.url, "prefill") as prefill,
        node(redis_server.url, "decode") as decode,
        node(redis_server.url, "plain", "--nixl", "off") as plain,
        prefill.client() as source,
    ):
        source.put(keys, payloads)
        assert source.push(keys[:2], decode.address, "nixl").stored == 2
        assert source.push(keys, decode.address).stored == 2  # auto: NIXL, the client kept
        with decode.client() as receiver:
            assert same(receiver.get(keys), payloads)
            assert receiver.stats().transfers.get("put/nixl") == 2
        with pytest.raises(Unavailable, match="NIXL is not on at both nodes"):
            source.push(keys, plain.address, "nixl")
        with plain.client() as receiver:
            assert receiver.lookup(keys) == 0


def test_a_holder_restarted_between_fetches_is_met_anew(redis_server) -> None:
    """The reader's kept client of the holder fails against the holder's new run: it is
    dropped, and a new one (a new NIXL session, the reader's arena registered anew)
    fetches at once; no block of the old run's session is read or written."""
    first, second = prompt(b"before restart", 3), prompt(b"after restart", 3)
    payloads = blocks(3, MiB, 14)
    with node(redis_server.url, "reader") as reader:
        with node(redis_server.url, "holder") as holder, reader.client() as c:
            with holder.client() as h:
                h.put(first, blocks(3, MiB, 15))
            published(redis_server.url, first, {"holder": 3})
            assert len(c.get(first, fetch=True)) == 3
            address = holder.address
        with (
            node(redis_server.url, "holder", "--address", address) as holder,
            reader.client() as c,
        ):
            assert holder.address == address
            with holder.client() as h:
                h.put(second, payloads)
            published(redis_server.url, second, {"holder": 3})
            assert same(c.get(second, fetch=True), payloads)
            with holder.client() as h:
                assert h.stats().transfers.get("get/nixl") == 1


@pytest.mark.parametrize("off", ["holder", "reader"])
def test_with_nixl_off_on_one_side_nodes_move_blocks_over_tcp(redis_server, off: str) -> None:
    keys = prompt(f"nixl off at the {off}".encode(), 3)
    payloads = blocks(3, MiB, 16)
    flags = {name: ("--nixl", "off") if name == off else () for name in ("holder", "reader")}
    with (
        node(redis_server.url, "holder", *flags["holder"]) as holder,
        node(redis_server.url, "reader", *flags["reader"]) as reader,
    ):
        with holder.client() as c:
            c.put(keys, payloads)
            assert c.push(keys[:1], reader.address).stored == 1
        published(redis_server.url, keys[1:], {"holder": 2})
        with reader.client() as c:
            assert same(c.get(keys, fetch=True), payloads)
            assert c.stats().transfers.get("put/tcp") == 1
        with holder.client() as c:
            assert c.stats().transfers.get("get/tcp") == 1
            assert "get/nixl" not in c.stats().transfers


def test_only_a_node_that_proves_the_secret_gets_a_session(redis_server) -> None:
    """A node of another secret is refused at Hello, both ways, before any data connection
    (and so any NIXL session) is opened."""
    keys = prompt(b"strangers", 2)
    stranger = secret_file()
    with (
        node(redis_server.url, "holder", *METRICS) as holder,
        node(redis_server.url, "other", "--push-allow", "127.0.0.1",
             env={"KVSTORE_CLUSTER_SECRET": stranger}) as other,
    ):  # fmt: skip
        with other.client() as c:
            c.put(keys, blocks(2, MiB, 17))
            with pytest.raises(PermissionDenied, match="did not prove"):
                c.push(keys, holder.address, "nixl")
        wrong = ClusterSecret.read(stranger)
        with pytest.raises(PermissionDenied, match="did not prove"):
            _prove(holder.address, wrong)
        instance = hello(holder.address).instance
        with (
            grpc.insecure_channel(holder.address) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            channel.unary_unary(f"/{SERVICE}/Hello")(
                b"", metadata=(("authorization", wrong.credential(instance)),)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert scrape(holder)[("kvstore_data_connections", ())] == 0


def test_a_secret_rotation_ends_the_old_nodes_connections_and_sessions(
    redis_server, tmp_path
) -> None:
    """The holder moves to a secret the reader lacks (SIGHUP): the reader's connections,
    its NIXL session's with them, are ended, and it can fetch nothing more."""
    shared, fresh = os.urandom(24).hex(), os.urandom(24).hex()
    files = {name: tmp_path / f"{name}.secret" for name in ("holder", "reader")}
    for path in files.values():
        path.write_text(shared + "\n")
    first, second = prompt(b"rotation 1", 2), prompt(b"rotation 2", 2)
    env = {name: {"KVSTORE_CLUSTER_SECRET": str(path)} for name, path in files.items()}
    with (
        node(redis_server.url, "holder", *METRICS, env=env["holder"]) as holder,
        node(redis_server.url, "reader", env=env["reader"]) as reader,
        reader.client() as c,
    ):
        with holder.client() as h:
            h.put(first + second, blocks(4, MiB, 18))
        poll(lambda: [n.matched for n in c.locate(first)] == [2])  # the holder's, signed
        assert len(c.get(first, fetch=True)) == 2  # over NIXL: a session, on its connection
        assert scrape(holder)[("kvstore_data_connections", ())] >= 1
        files["holder"].write_text(fresh + "\n")
        holder.process.send_signal(signal.SIGHUP)
        _wait_log(holder, "its tenant was removed or changed")
        poll(lambda: scrape(holder)[("kvstore_data_connections", ())] == 0)
        assert c.get(second, fetch=True) == []
