"""The request channel on the wire: tickets, framing, partial and slow transfers, limits."""

import socket
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from conftest import (
    drip,
    hello,
    hello_reply,
    raw_channel,
    read_answer,
    running_daemon,
    send_request,
)
from kvstore.bench.procs import free_port
from kvstore.errors import ResourceExhausted, Unavailable, Unsupported
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    GET,
    HEADER,
    HELLO,
    HELLO_MAGIC,
    INLINE,
    LOOKUP,
    PUT,
    READY,
    REQUEST_MAGIC,
    VERSION,
    encode,
    hello_frame,
)

MiB = 1 << 20
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


def keys_for(salt: bytes, n: int) -> list[bytes]:
    return block_keys(np.arange(n * 16), 16, salt)


def headers(keys: list[bytes], sizes: list[int], **meta) -> pb.BlockHeaders:
    return pb.BlockHeaders(
        blocks=[
            pb.BlockHeader(key=k, meta=pb.BlockMeta(size=n, **meta))
            for k, n in zip(keys, sizes, strict=True)
        ]
    )


def connect(info: pb.NodeInfo, source: str = "127.0.0.1") -> socket.socket:
    host, _, port = info.data_address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))


@pytest.fixture
def witness(daemon, salt) -> Iterator[bytes]:
    """A block stored before the test, checked byte for byte after it."""
    key = block_keys(np.arange(16), 16, salt + b"witness")
    with daemon.client() as c:
        c.put(key, [b"still here"])
    yield key[0]
    with daemon.client(transport="tcp") as c:
        assert [bytes(b) for b in c.get(key)] == [b"still here"]


def test_a_ticket_opens_one_connection_only(daemon) -> None:
    info = hello(daemon.address)
    for attempt in range(2):
        with connect(info) as sock:
            sock.sendall(hello_frame(info.ticket))
            status, message = hello_reply(sock)
            if attempt == 0:
                assert status == 0
            else:
                assert status == UNAUTHENTICATED and "already used" in message
                assert sock.recv(1) == b""  # and the node hung up


def test_a_ticket_is_bound_to_the_host_that_asked(daemon) -> None:
    info = hello(daemon.address)
    with connect(info, source="127.0.0.2") as sock:
        sock.sendall(hello_frame(info.ticket))
        status, message = hello_reply(sock)
    assert status == UNAUTHENTICATED and "issued to 127.0.0.1, not 127.0.0.2" in message


def test_an_expired_ticket_is_refused() -> None:
    with running_daemon("--host-capacity", "4MiB", "--ticket-ttl", "0") as daemon:
        info = hello(daemon.address)
        with connect(info) as sock:
            sock.sendall(hello_frame(info.ticket))
            status, message = hello_reply(sock)
        assert status == UNAUTHENTICATED and "expired" in message


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n" + bytes(40),  # not even a hello
        HELLO.pack(HELLO_MAGIC, VERSION + 7, bytes(16), bytes(16)),  # another version
        None,  # a good hello, then a frame that is no frame
        b"KQ",  # a good hello, then a frame cut after two bytes
    ],
)
def test_garbage_closes_only_that_connection(daemon, witness, garbage) -> None:
    info = hello(daemon.address)
    with connect(info) as sock:
        if garbage in (None, b"KQ"):
            sock.sendall(hello_frame(info.ticket))
            assert hello_reply(sock)[0] == 0
            sock.sendall(b"\x00" * 64 if garbage is None else garbage)
            if garbage == b"KQ":
                sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(garbage)
        hung_up(sock)
    with daemon.client(transport="tcp") as other:  # everyone else is served as before
        assert other.lookup([witness]) == 1


def test_an_unknown_operation_is_refused_and_the_connection_goes_on(daemon, witness) -> None:
    with raw_channel(daemon.address) as sock:
        send_request(sock, 99, pb.GetRequest(keys=[witness]))
        error = read_answer(sock)
        assert error.kind == INVALID and b"op: unknown operation 99" in error.meta
        send_request(sock, LOOKUP, pb.GetRequest(keys=[witness]))
        assert pb.LookupReply.FromString(read_answer(sock).meta).found == 1


def test_a_cut_connection_leaves_no_partial_block(daemon, salt) -> None:
    keys = keys_for(salt, 2)
    with raw_channel(daemon.address) as sock:
        data = b"a" * MiB + b"b" * (MiB // 2)
        meta = headers(keys, [MiB, MiB]).SerializeToString()
        sock.sendall(encode(REQUEST_MAGIC, PUT, INLINE, meta, 2 * MiB) + data)
        sock.shutdown(socket.SHUT_WR)  # the sender dies half way through block 1
        assert sock.recv(1) == b""  # the node closes without an answer
    with daemon.client() as client:
        assert client.lookup(keys) == 1
        assert [bytes(b) for b in client.get(keys)] == [b"a" * MiB]


def test_present_blocks_are_not_sent_again(daemon, salt) -> None:
    keys = keys_for(salt, 3)
    with daemon.client() as client:
        client.put(keys[:2], [b"0", b"1"])
    with raw_channel(daemon.address) as sock:
        send_request(sock, PUT, headers(keys, [1, 1, 1]))
        ready = read_answer(sock)
        assert ready.flags & READY and list(pb.PutAnswer.FromString(ready.meta).present) == [0, 1]
        sock.sendall(b"2")  # only the missing block's bytes
        reply = pb.PutReply.FromString(read_answer(sock).meta)
        assert (reply.stored, reply.existed) == (1, 2)
    with daemon.client() as client:
        assert [bytes(b) for b in client.get(keys)] == [b"0", b"1", b"2"]


def test_a_corrupt_payload_fails_its_checksum_and_the_connection_goes_on(daemon, salt) -> None:
    keys = keys_for(salt, 2)
    with raw_channel(daemon.address) as sock:
        send_request(sock, PUT, headers(keys, [4, 2], checksum=12345), flags=INLINE, data=b"oopsok")
        error = read_answer(sock)
        assert error.kind == INVALID and b"blocks[0].checksum" in error.meta
        send_request(sock, LOOKUP, pb.GetRequest(keys=keys))
        assert pb.LookupReply.FromString(read_answer(sock).meta).found == 0


@pytest.fixture
def strict_daemon() -> Iterator:
    """Stalls and slow transfers are dropped quickly here."""
    with running_daemon(
        "--host-capacity", "16MiB", "--data-timeout", "0.5", "--min-rate", "1MiB",
        "--reserve-timeout", "20",
    ) as d:  # fmt: skip
        yield d


def test_a_stalled_writer_times_out_and_frees_its_reservation(strict_daemon) -> None:
    keys = keys_for(b"stall", 2)
    with raw_channel(strict_daemon.address) as sock:
        send_request(sock, PUT, headers(keys[:1], [12 * MiB]))
        assert read_answer(sock).flags & READY
        sock.sendall(bytes(MiB))  # then nothing
        assert sock.recv(1) == b""  # the node gave up on us
    with strict_daemon.client() as client:  # 12 MiB fit again: the reservation was freed
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys) == 0


def test_a_dripping_writer_is_dropped_at_its_deadline(strict_daemon) -> None:
    """One byte now and then never stalls a read for long, but the whole transfer has a
    deadline (--data-timeout plus its bytes at --min-rate): past it, what it holds is freed."""
    keys = keys_for(b"drip", 2)
    with raw_channel(strict_daemon.address) as sock:
        send_request(sock, PUT, headers(keys[:1], [12 * MiB]))
        assert read_answer(sock).flags & READY
        # at this pace the bytes would take days; well under --data-timeout per byte
        assert drip(sock, bytes(12 * MiB), 0.1) < 12 * MiB
    with strict_daemon.client() as client:
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1


def test_a_stalled_reader_holds_nothing_beyond_its_deadline(strict_daemon) -> None:
    keys = keys_for(b"slow", 2)
    with strict_daemon.client() as client:
        client.put(keys[:1], [np.ones(12 * MiB, np.uint8)])
        with raw_channel(strict_daemon.address) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            send_request(sock, GET, pb.GetRequest(keys=keys[:1]))  # and never read
            # the pinned block is released when the node's send gives up: this put waits for it
            assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys[1:]) == 1


def hung_up(sock: socket.socket) -> None:
    """Read until the node closes the connection (a refusal may come first)."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:  # closed with our bytes unread: also a hang-up
        pass


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_idle_connections_cost_no_threads_and_are_bounded_per_host() -> None:
    with (
        running_daemon("--host-capacity", "4MiB", "--max-host-connections", "300") as daemon,
        daemon.client(transport="tcp") as client,
    ):
        client.put(keys_for(b"idle", 1), [b"x"])
        before = threads_of(daemon.process.pid)
        infos = [hello(daemon.address) for _ in range(300)]
        socks = [connect(info) for info in infos]  # with the client's own: one too many
        try:
            for sock, info in zip(socks[:299], infos, strict=False):
                sock.sendall(hello_frame(info.ticket))
                assert hello_reply(sock)[0] == 0
            status, message = hello_reply(socks[299])
            assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "127.0.0.1 has 300 data connections open already" in message
            assert threads_of(daemon.process.pid) <= before + 2  # 299 idle: no thread each
            assert client.get(keys_for(b"idle", 1))[0].tobytes() == b"x"  # and still served
        finally:
            for sock in socks:
                sock.close()


def test_a_put_under_exhaustion_is_resource_exhausted_on_every_path() -> None:
    """The tier is full of pinned blocks (a lease's, in flight within the node's bound): the
    put fails as RESOURCE_EXHAUSTED, never as a broken connection, and the connection
    serves the next request."""
    keys = keys_for(b"full", 4)
    flags = ("--host-capacity", "16MiB", "--reserve-timeout", "2", "--max-inflight-bytes", "64MiB")
    with running_daemon(*flags) as node, node.client(transport="shm") as holder:
        holder.put(keys[:1], [np.ones(15 * MiB, np.uint8)])
        with holder.lease(keys[:1]):
            for transport in ("tcp", "grpc", "shm"):
                with node.client(transport=transport) as client:
                    with pytest.raises(ResourceExhausted, match="no room"):
                        client.put(keys[1:2], [np.zeros(8 * MiB, np.uint8)])
                    assert client.lookup(keys[:1]) == 1


def test_without_a_data_plane_auto_falls_back_and_tcp_refuses() -> None:
    with running_daemon("--host-capacity", "4MiB", "--data-address", "off") as daemon:
        keys = keys_for(b"off", 1)
        with daemon.client() as client:
            assert client.put(keys, [b"via grpc"]).stored == 1
            assert bytes(client.get(keys)[0]) == b"via grpc"
            assert client.path == "grpc" and set(client.stats().fallbacks) == {"shm", "nixl", "tcp"}
        with daemon.client(transport="tcp") as client, pytest.raises(Unsupported):
            client.get(keys)


def test_many_blocks_over_one_pooled_connection(daemon, salt, rng) -> None:
    keys = keys_for(salt, 500)
    payloads = [rng.integers(0, 256, int(n), np.uint8) for n in rng.integers(1, 70_000, 500)]
    with daemon.client(transport="tcp") as client:
        for start in range(0, 500, 50):
            client.put(keys[start : start + 50], payloads[start : start + 50])
        got = client.get(keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, payloads, strict=True))
        assert client.stats().transfers.get("get/tcp", 0) >= 1


def test_a_client_outlives_a_restart_of_its_node(tmp_path) -> None:
    """Its pooled connections die with the node; the next call meets the node anew."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    keys = keys_for(b"restart", 2)
    flags = ("--host-capacity", "4MiB", "--disk-dir", str(tmp_path), "--persist-on-shutdown")
    with running_daemon(*flags, "--address", address) as first:
        client = first.client(transport="tcp")
        client.put(keys[:1], [b"before"])
    with running_daemon(*flags, "--address", address):
        assert client.put(keys[1:], [b"after"]).stored == 1
        assert [bytes(b) for b in client.get(keys)] == [b"before", b"after"]
    with pytest.raises(Unavailable):  # and with no node there, an error, not a hang
        client.get(keys)
    client.close()


def test_leases_and_in_place_puts_outlive_a_restart_of_their_node(tmp_path) -> None:
    """Over shared memory too: the first lease, in-place put or get_into after the node
    restarted meets the new node, maps its arena, and works."""
    address = f"127.0.0.1:{free_port()}"
    keys = keys_for(b"restart-shm", 3)
    block = np.arange(4096, dtype=np.uint8)

    def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
        for slot in slots:
            slot[:] = block

    with running_daemon("--host-capacity", "64MiB", "--address", address) as first:
        client = first.client(transport="shm")
        client.put_in_place(keys[:1], np.uint8, block.shape, fill)
        client.lease(keys[:1]).release()
        assert client.lookup(keys) == 1  # carries the release: a pooled connection is left
    with running_daemon("--host-capacity", "64MiB", "--address", address):
        with client.lease(keys[:1]) as lease:  # the node is new: nothing to lease
            assert lease.blocks == []
        assert client.put_in_place(keys, np.uint8, block.shape, fill).stored == 3
        with client.lease(keys) as lease:
            assert all(np.array_equal(b, block) for b in lease.blocks) and len(lease.blocks) == 3
    with running_daemon("--host-capacity", "64MiB", "--address", address):
        landed: list[int] = []
        place = lambda blocks: [np.empty(m.size, np.uint8) for _, m in blocks]  # noqa: E731
        assert client.get_into(keys, place, landed.append) == 0 and landed == []
    client.close()


def test_a_frame_too_large_to_parse_is_refused(daemon) -> None:
    with raw_channel(daemon.address) as sock:
        sock.sendall(HEADER.pack(REQUEST_MAGIC, GET, 0, 1 << 30, 0))
        assert sock.recv(1) == b""  # closed before reading a byte of it
