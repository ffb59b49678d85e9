"""Slow and silent peers on the data plane hold no thread: a TLS handshake, a HELLO and each
request's header and metadata are gathered without waiting, under a total deadline
(`min(--data-timeout, 5 s)` for the HELLO, `--data-timeout` for a header), so a few
one-byte connections cannot stop a node with a few `--data-workers`."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import numpy as np
import pytest
import test_tls
from test_tls import Pki, hello_tls

from conftest import Daemon, drip, hello, hello_reply, running_daemon
from kvstore.client import Client
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import LOOKUP, REQUEST_MAGIC, encode, hello_frame

TIMEOUT = 6.0  # --data-timeout: what a one-byte connection held a thread for, before
HELLO_DUE = 5.0  # min(--data-timeout, 5 s)
SLACK = 2.5  # the sweeper's period (at most 1 s) and a loaded machine
CLIENT_TIMEOUT = 3  # what a call may stall for: a bound on hanging, under TIMEOUT
WORKERS = ("--data-workers", "2")
pki = test_tls.pki  # the TLS tests' certificates: a fixture
HEADER = encode(REQUEST_MAGIC, LOOKUP, 0, pb.GetRequest(keys=[bytes(16)]).SerializeToString())


@pytest.fixture(scope="module")
def node() -> Iterator[Daemon]:
    with running_daemon("--host-capacity", "4MiB", *WORKERS, "--data-timeout", str(TIMEOUT)) as d:
        yield d


@pytest.fixture(scope="module")
def tls_node(pki: Pki) -> Iterator[Daemon]:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with running_daemon(
        "--host-capacity", "4MiB", *WORKERS, "--data-timeout", str(TIMEOUT), *flags
    ) as d:
        yield d


def data_port(info: pb.NodeInfo) -> tuple[str, int]:
    host, _, port = info.data_address.rpartition(":")
    return host, int(port)


def one_byte(address: tuple[str, int], byte: bytes = b"K") -> socket.socket:
    sock = socket.create_connection(address, 10)
    sock.sendall(byte)  # and nothing more
    return sock


def closed_by(sock: socket.socket, deadline: float) -> None:
    """The node closes the connection (EOF) by `deadline`, having sent nothing more."""
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        assert sock.recv(1) == b""
    except TimeoutError:
        pytest.fail("the node kept a connection open past its deadline")
    finally:
        sock.close()


def keys_for(name: str) -> list[bytes]:
    return block_keys(np.arange(16), 16, name.encode())


def round_trip(client: Client, name: str) -> None:
    keys = keys_for(name)
    assert client.put(keys, [name.encode()]).stored == 1
    assert [bytes(b) for b in client.get(keys)] == [name.encode()]


def test_one_byte_connections_do_not_stop_the_data_plane(node) -> None:
    info = hello(node.address)
    address = data_port(info)
    begun: list[tuple[socket.socket, float]] = []
    for _ in range(2):  # a HELLO, then one byte of a request's header
        ticket = hello(node.address).ticket
        sock = socket.create_connection(address, 10)
        sock.sendall(hello_frame(ticket))
        assert hello_reply(sock)[0] == 0
        sock.sendall(HEADER[:1])
        begun.append((sock, time.monotonic()))
    opened = time.monotonic()
    silent = [one_byte(address) for _ in range(8)]  # four times the workers
    with node.client(transport="tcp", timeout=CLIENT_TIMEOUT) as client:
        round_trip(client, "past one-byte connections")
        assert client.path == "tcp"
    for sock in silent:
        closed_by(sock, opened + HELLO_DUE + SLACK)
    for sock, started in begun:
        closed_by(sock, started + TIMEOUT + SLACK)


def test_a_dripping_request_header_is_closed_at_its_deadline() -> None:
    """One byte now and then never stalls a read for long, but a request's header and
    metadata must be whole within --data-timeout of its first byte."""
    timeout = 1.0
    with (
        running_daemon("--host-capacity", "4MiB", *WORKERS, "--data-timeout", str(timeout)) as d,
        socket.create_connection(data_port(info := hello(d.address)), 10) as sock,
    ):
        sock.sendall(hello_frame(info.ticket))
        assert hello_reply(sock)[0] == 0
        sock.settimeout(None)  # so that MSG_DONTWAIT alone decides: no poll() first
        started = time.monotonic()
        # at this pace the frame would take 3 x --data-timeout
        assert drip(sock, HEADER[:-1], 3 * timeout / len(HEADER)) < len(HEADER) - 1
        assert time.monotonic() - started < timeout + SLACK


def test_a_tls_node_is_not_stopped_by_one_byte_connections(tls_node, pki: Pki) -> None:
    address = data_port(hello_tls(tls_node, pki))
    context = ssl.create_default_context(cafile=str(pki.ca))
    begun: list[tuple[socket.socket, float]] = []
    for _ in range(2):  # the handshake, then one byte of HELLO
        sock = context.wrap_socket(
            socket.create_connection(address, 10), server_hostname=address[0]
        )
        sock.sendall(b"K")
        begun.append((sock, time.monotonic()))
    opened = time.monotonic()
    silent = [one_byte(address, b"\x16") for _ in range(8)]  # a handshake record begun
    options = {"tls_ca": str(pki.ca), "timeout": CLIENT_TIMEOUT}
    with Client(tls_node.address, transport="tcp", **options) as client:
        round_trip(client, "tls past one-byte connections")
        assert client.path == "tcp"
    for sock in silent:
        closed_by(sock, opened + HELLO_DUE + SLACK)
    for sock, started in begun:
        with contextlib.suppress(ssl.SSLEOFError):  # closed without a TLS goodbye: EOF too
            closed_by(sock, started + HELLO_DUE + SLACK)


def test_refused_hellos_give_their_connection_slots_back() -> None:
    with running_daemon("--host-capacity", "4MiB", "--max-host-connections", "2") as d:
        address = data_port(hello(d.address))
        for _ in range(4):  # twice the host's connections, one after another
            with socket.create_connection(address, 10) as sock:
                sock.sendall(hello_frame(bytes(16)))  # a ticket never issued
                status, message = hello_reply(sock)
                assert "ticket unknown" in message, (status, message)
                assert sock.recv(1) == b""
