"""The raw TCP data plane: tickets, partial transfers, stalls, fallback, node-to-node push."""

import socket
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from conftest import raw_call, running_daemon
from kvstore.client.dataplane import DataConnections
from kvstore.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.dataplane import MAGIC, PREAMBLE, read_trailer, recv_exact

MiB = 1 << 20
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


def keys_for(salt: bytes, n: int) -> list[bytes]:
    return block_keys(np.arange(n * 16), 16, salt)


def open_ticket(address: str, method: str, request) -> pb.Ticket:
    return pb.Ticket.FromString(raw_call(address, method, request))


def headers(keys: list[bytes], sizes: list[int], **meta) -> pb.BlockHeaders:
    return pb.BlockHeaders(
        blocks=[
            pb.BlockHeader(key=k, meta=pb.BlockMeta(size=n, **meta))
            for k, n in zip(keys, sizes, strict=True)
        ]
    )


def connect(ticket: pb.Ticket, source: str = "127.0.0.1") -> socket.socket:
    host, _, port = ticket.data_address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))


def test_a_ticket_cannot_be_replayed(daemon, client, salt) -> None:
    keys = keys_for(salt, 1)
    client.put(keys, [b"x" * 1000])
    ticket = open_ticket(daemon.address, "OpenGet", pb.GetRequest(keys=keys))
    for attempt in range(2):
        with connect(ticket) as sock:
            sock.sendall(PREAMBLE.pack(MAGIC, ticket.id))
            if attempt == 0:
                payload = memoryview(bytearray(1000))
                recv_exact(sock, payload)
                assert bytes(payload) == b"x" * 1000 and read_trailer(sock).status == 0
            else:
                trailer = read_trailer(sock)
                assert trailer.status == UNAUTHENTICATED
                assert "already used" in trailer.message


def test_a_ticket_is_bound_to_the_host_that_asked(daemon, client, salt) -> None:
    keys = keys_for(salt, 1)
    client.put(keys, [b"secret"])
    ticket = open_ticket(daemon.address, "OpenGet", pb.GetRequest(keys=keys))
    with connect(ticket, source="127.0.0.2") as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id))
        trailer = read_trailer(sock)
    assert trailer.status == UNAUTHENTICATED
    assert "issued to 127.0.0.1, not 127.0.0.2" in trailer.message


def test_a_ticket_cannot_be_stretched_to_more_bytes(daemon, client, salt) -> None:
    keys = keys_for(salt, 2)
    ticket = open_ticket(daemon.address, "OpenPut", headers(keys[:1], [10]))
    blocks_before = client.stats().tiers[0].blocks
    with connect(ticket) as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id) + b"a" * 10 + b"b" * 20)
        assert read_trailer(sock).stored == 1
        trailer = read_trailer(sock)  # the extra bytes were read as a new preamble
    assert trailer.status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "bad preamble" in trailer.message
    assert [bytes(b) for b in client.get(keys)] == [b"a" * 10]
    assert client.stats().tiers[0].blocks == blocks_before + 1


def test_a_cut_connection_leaves_no_partial_block(daemon, client, salt) -> None:
    keys = keys_for(salt, 2)
    ticket = open_ticket(daemon.address, "OpenPut", headers(keys, [MiB, MiB]))
    with connect(ticket) as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id) + b"a" * MiB + b"b" * (MiB // 2))
        sock.shutdown(socket.SHUT_WR)  # the sender dies half way through block 1
        assert sock.recv(1) == b""  # the node closes without a trailer
    assert client.lookup(keys) == 1
    assert [bytes(b) for b in client.get(keys)] == [b"a" * MiB]


def test_present_blocks_are_not_sent_again(daemon, client, salt) -> None:
    keys = keys_for(salt, 3)
    client.put(keys[:2], [b"0", b"1"])
    ticket = open_ticket(daemon.address, "OpenPut", headers(keys, [1, 1, 1]))
    assert list(ticket.present) == [0, 1]
    assert client.put(keys, [b"X", b"Y", b"2"]).stored == 1
    assert [bytes(b) for b in client.get(keys)] == [b"0", b"1", b"2"]


def test_a_corrupt_payload_fails_its_checksum(daemon, client, salt) -> None:
    keys = keys_for(salt, 1)
    ticket = open_ticket(daemon.address, "OpenPut", headers(keys, [4], checksum=12345))
    with connect(ticket) as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id) + b"oops")
        trailer = read_trailer(sock)
    assert "blocks[0].checksum" in trailer.message
    assert client.lookup(keys) == 0


@pytest.fixture
def strict_daemon() -> Iterator:
    """Stalls and expiry come quickly here."""
    with running_daemon(
        "--host-capacity", "16MiB", "--data-timeout", "0.3", "--reserve-timeout", "20"
    ) as d:
        yield d


def test_a_stalled_writer_times_out_and_frees_its_reservation(strict_daemon) -> None:
    keys = keys_for(b"stall", 2)
    ticket = open_ticket(strict_daemon.address, "OpenPut", headers(keys[:1], [12 * MiB]))
    with connect(ticket) as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id) + bytes(MiB))  # then nothing
        assert sock.recv(1) == b""  # the node gave up on us
    with strict_daemon.client() as client:  # 12 MiB fit again: the reservation was freed
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys) == 0


def test_a_stalled_reader_holds_nothing_beyond_its_timeout(strict_daemon) -> None:
    keys = keys_for(b"slow", 2)
    with strict_daemon.client() as client:
        client.put(keys[:1], [np.ones(12 * MiB, np.uint8)])
        ticket = open_ticket(strict_daemon.address, "OpenGet", pb.GetRequest(keys=keys[:1]))
        with connect(ticket) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(PREAMBLE.pack(MAGIC, ticket.id))  # and never read
            # the pinned block is released when the node's send times out: this put waits for it
            assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys[1:]) == 1


def test_an_expired_ticket_is_refused() -> None:
    with (
        running_daemon("--host-capacity", "4MiB", "--ticket-ttl", "0") as daemon,
        daemon.client(transport="tcp") as client,
        pytest.raises(Unauthenticated, match="expired"),
    ):
        client.put(keys_for(b"ttl", 1), [b"late"])


def test_without_a_data_plane_auto_falls_back_and_tcp_refuses() -> None:
    with running_daemon("--host-capacity", "4MiB", "--data-address", "off") as daemon:
        keys = keys_for(b"off", 1)
        with daemon.client() as client:
            assert client.put(keys, [b"via grpc"]).stored == 1
            assert bytes(client.get(keys)[0]) == b"via grpc"
        with daemon.client(transport="tcp") as client, pytest.raises(Unsupported):
            client.get(keys)


def test_an_unreachable_data_port_falls_back_to_grpc(daemon, salt, monkeypatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    real = DataConnections.connection
    monkeypatch.setattr(DataConnections, "connection", lambda self, _: real(self, dead))
    keys = keys_for(salt, 1)
    with daemon.client() as client:
        assert client.put(keys, [b"still stored"]).stored == 1
        assert bytes(client.get(keys)[0]) == b"still stored"
    with daemon.client(transport="tcp") as client, pytest.raises(Unavailable, match="unreachable"):
        client.get(keys)


def test_push_moves_blocks_node_to_node(daemon, salt, rng) -> None:
    payloads = [rng.integers(0, 256, n, np.uint8) for n in (MiB, 3 * MiB + 5, 17)]
    keys = keys_for(salt, 4)
    with running_daemon("--host-capacity", "64MiB") as decode_node, daemon.client() as prefill:
        prefill.put(keys[:3], payloads)
        reply = prefill.push(keys, decode_node.address)
        assert (reply.found, reply.stored, reply.existed) == (3, 3, 0)
        assert prefill.push(keys, decode_node.address).existed == 3
        with decode_node.client() as decode:
            got = decode.get(keys)
            assert len(got) == 3 and all(
                np.array_equal(a, b) for a, b in zip(got, payloads, strict=True)
            )
        assert prefill.push(keys[3:], decode_node.address).found == 0
        with pytest.raises(Unavailable, match=r"push to 127\.0\.0\.1:1 failed"):
            prefill.push(keys[:1], "127.0.0.1:1")


def test_many_blocks_over_one_pooled_connection(daemon, salt, rng) -> None:
    keys = keys_for(salt, 500)
    payloads = [rng.integers(0, 256, int(n), np.uint8) for n in rng.integers(1, 70_000, 500)]
    with daemon.client(transport="tcp", checksum=True) as client:
        for start in range(0, 500, 50):
            client.put(keys[start : start + 50], payloads[start : start + 50])
        got = client.get(keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, payloads, strict=True))


def test_resource_exhausted_travels_over_the_data_plane(small_daemon) -> None:
    with small_daemon.client(transport="tcp") as client, pytest.raises(ResourceExhausted):
        client.put(keys_for(b"big", 1), [np.zeros(17 * MiB, np.uint8)])


@pytest.mark.parametrize("transport", ["tcp", "grpc", "shm"])
def test_push_takes_the_path_asked_for(daemon, salt, transport: str) -> None:
    keys = keys_for(salt, 2)
    with running_daemon("--host-capacity", "8MiB") as target, daemon.client() as source:
        source.put(keys, [b"one", b"two"])
        assert source.push(keys, target.address, transport).stored == 2
        with target.client() as receiver:
            assert receiver.stats().transfers == {f"put/{transport}": 1}
        with pytest.raises(InvalidArgument, match="unknown transport"):
            source.push(keys, target.address, "pigeon")


def test_a_pooled_connection_the_node_closed_is_replaced(daemon, salt) -> None:
    keys = keys_for(salt, 2)
    with daemon.client(transport="tcp") as client:
        client.put(keys[:1], [b"first"])
        for pooled in client._data._idle.values():  # the node drops them (e.g. at a restart)
            for sock in pooled:
                sock.shutdown(socket.SHUT_RDWR)
        assert client.put(keys[1:], [b"second"]).stored == 1
        assert [bytes(b) for b in client.get(keys)] == [b"first", b"second"]
