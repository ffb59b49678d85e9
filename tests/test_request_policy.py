"""One request policy on every path (shm, tcp, grpc): a get or lease holds its bytes in
flight and is refused as busy past the node's bound; a put holds what it declared from its
first byte; transfers count the bytes that moved; a put charges its tenant for every block
it names; a refused get reads nothing; a get waiting for its blocks is a transfer."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from test_cluster_index import poll
from test_metrics import scrape

from conftest import SERVICE, Daemon, raw_channel, read_answer, running_daemon, send_request
from kvstore.errors import ResourceExhausted
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import BUSY, GET, MAX_INLINE, PUT, READY
from kvstore.proto.frames import encode_data

MiB = 1 << 20
PATHS = ["shm", "tcp", "grpc"]
TOKEN = "alice-token-0123456789"
AUTH = f"""
secret = "a-secret-of-at-least-32-characters-0123456789"

[[tenant]]
name = "alice"
token = "{TOKEN}"
quota = "2MiB"
shm = true
"""


@contextmanager
def node(*flags: str) -> Iterator[Daemon]:
    with running_daemon(
        "--host-capacity", "64MiB", "--metrics-address", "127.0.0.1:0", *flags
    ) as d:  # fmt: skip
        yield d


def in_flight(d: Daemon) -> float:
    """Payload bytes the node holds in flight now."""
    return scrape(d)["kvstore_inflight_bytes", ()]


def keys_for(salt: str, n: int) -> list[bytes]:
    return block_keys(np.arange(n * 16), 16, f"policy/{salt}".encode())


@contextmanager
def sending(d: Daemon, key: bytes) -> Iterator[socket.socket]:
    """A put of one 1 MiB block the node told to send (so holds in flight); its bytes go
    when the test is done with it."""
    block = pb.BlockHeader(key=key, meta=pb.BlockMeta(size=MiB))
    with raw_channel(d.address) as sock:
        send_request(sock, PUT, pb.BlockHeaders(blocks=[block]))
        assert read_answer(sock).flags & READY
        yield sock
        sock.sendall(bytes(MiB))
        assert pb.PutReply.FromString(read_answer(sock).meta).stored == 1


def test_a_lease_holds_its_bytes_in_flight_until_it_is_released() -> None:
    keys = keys_for("lease", 2)
    with node() as d, d.client(transport="shm", timeout=30) as c:
        c.put(keys, [np.full(MiB, 1, np.uint8)] * 2)
        with c.lease(keys) as lease:
            assert len(lease.blocks) == 2
            assert in_flight(d) == 2 * MiB
        poll(lambda: in_flight(d) == 0)


@pytest.mark.parametrize("path", PATHS)
def test_a_get_past_the_nodes_bound_is_refused_as_busy_and_retried(path: str) -> None:
    keys = keys_for(f"busy/{path}", 2)
    block = np.full(MiB, 5, np.uint8)
    with (
        node("--max-inflight-bytes", "1MiB") as d,
        d.client(transport=path, timeout=30) as c,
    ):
        c.put(keys[1:], [block])
        got: list[np.ndarray] = []
        with sending(d, keys[0]):  # 1 MiB in flight: the node's bound
            getter = threading.Thread(target=lambda: got.extend(c.get(keys[1:])))
            getter.start()
            poll(lambda: scrape(d)["kvstore_busy_refusals_total", ()] >= 1)
        getter.join(timeout=30)
        assert [bytes(g) for g in got] == [block.tobytes()]


def test_each_busy_refusal_is_counted_once() -> None:
    keys = keys_for("counted", 2)
    with node("--max-inflight-bytes", "1MiB") as d, d.client(transport="tcp") as c:
        c.put(keys[1:], [np.ones(MiB, np.uint8)])
        with (
            sending(d, keys[0]),
            raw_channel(d.address) as sock,
            grpc.insecure_channel(d.address) as channel,
        ):
            send_request(sock, GET, pb.GetRequest(keys=keys[1:]))
            assert read_answer(sock).flags & BUSY
            get = channel.unary_stream(f"/{SERVICE}/Get")
            with pytest.raises(grpc.RpcError) as refused:
                list(get(pb.GetRequest(keys=keys[1:]).SerializeToString(), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert scrape(d)["kvstore_busy_refusals_total", ()] == 2


@pytest.mark.parametrize("path", PATHS)
def test_a_get_past_the_connections_bound_is_refused_and_reads_nothing(path: str) -> None:
    keys = keys_for(f"connection/{path}", 3)
    block = np.full(MiB, 3, np.uint8)
    tenant = (("tenant", ""),)
    with (
        node("--max-connection-bytes", "2MiB", "--metrics-tenants") as d,
        d.client(transport=path, timeout=30) as c,
    ):
        c.put(keys[:2], [block] * 2)
        c.put(keys[2:], [block])
        with pytest.raises(ResourceExhausted, match="split the batch"):
            c.get(keys)
        assert scrape(d).get(("kvstore_tenant_hits_total", tenant), 0) == 0
        assert len(c.get(keys[:2])) == 2
        assert scrape(d)["kvstore_tenant_hits_total", tenant] == 2


@pytest.mark.parametrize(("path", "moved"), [("shm", 2), ("tcp", 2), ("grpc", 3)])
def test_transfers_count_the_bytes_that_moved(path: str, moved: int) -> None:
    """A put names a block stored already: shm and tcp (past the inline size) leave its
    bytes out, gRPC sends them."""
    keys = keys_for(f"moved/{path}", 2)
    block = np.full(MAX_INLINE, 9, np.uint8)
    with node() as d, d.client(transport=path, timeout=30) as c:
        c.put(keys[:1], [block])
        assert c.put(keys, [block] * 2).stored == 1
        put = ("kvstore_transfer_bytes_total", (("direction", "put"), ("path", path)))
        assert scrape(d)[put] == moved * MAX_INLINE


@pytest.mark.parametrize("path", PATHS)
def test_a_put_makes_every_block_it_names_its_tenants_warmest(tmp_path, path: str) -> None:
    """Past its quota a tenant loses its coldest block: not one it just put again."""
    auth = tmp_path / "tenants.toml"
    auth.write_text(AUTH)
    keys = keys_for(f"warmest/{path}", 3)
    block = np.full(MiB, 4, np.uint8)
    with (
        node("--auth-file", str(auth)) as d,
        d.client(token=TOKEN, transport=path, timeout=30) as c,
    ):
        for i in (0, 1, 0, 2):  # the second put of keys[0] finds it stored; keys[2] overflows
            c.put(keys[i : i + 1], [block])
        assert [c.lookup(keys[i : i + 1]) for i in range(3)] == [1, 0, 1]


@pytest.mark.parametrize("path", PATHS)
def test_a_get_waiting_for_its_blocks_is_a_transfer_in_flight(path: str) -> None:
    keys = keys_for(f"waiting/{path}", 1)
    block = np.full(MiB, 6, np.uint8)
    with node() as d, d.client(transport=path, timeout=30) as c, d.client() as producer:
        got: list[np.ndarray] = []
        getter = threading.Thread(target=lambda: got.extend(c.get(keys, wait=30)))
        getter.start()
        poll(lambda: scrape(d)["kvstore_inflight_transfers", ()] == 1)
        producer.put(keys, [block])
        getter.join(timeout=30)
        assert [bytes(g) for g in got] == [block.tobytes()]


def test_a_grpc_put_holds_what_it_declared_from_its_first_byte() -> None:
    """As a tcp put does once told to send: not only the bytes that came so far."""
    key = keys_for("first-byte", 1)[0]
    more = threading.Event()

    def frames() -> Iterator[bytes]:
        block = pb.BlockHeader(key=key, meta=pb.BlockMeta(size=MiB))
        yield pb.PutRequest(headers=pb.BlockHeaders(blocks=[block])).SerializeToString()
        yield encode_data([b"x"])
        more.wait(30)
        yield encode_data([bytes(MiB - 1)])

    with node() as d, grpc.insecure_channel(d.address) as channel:
        put = channel.stream_unary(f"/{SERVICE}/Put").future(frames(), timeout=60)
        poll(lambda: in_flight(d) == MiB)
        more.set()
        assert pb.PutReply.FromString(put.result(timeout=30)).stored == 1
        assert in_flight(d) == 0


def test_a_shared_memory_put_holds_its_slots_in_flight_until_committed() -> None:
    keys = keys_for("slots", 2)
    seen: list[float] = []

    def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
        seen.append(in_flight(d))
        for slot in slots:
            slot[:] = 8

    with node() as d, d.client(transport="shm", timeout=30) as c:
        assert c.put_in_place(keys, np.uint8, (MiB,), fill).stored == 2
        assert seen == [2 * MiB]
        poll(lambda: in_flight(d) == 0)
