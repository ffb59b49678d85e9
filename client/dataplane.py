"""The client's side of the data plane (proto/DATAPLANE.md): pooled TCP connections,
payloads sent with scatter-gather writes and received with `recv_into` straight
into their destination."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import grpc
import numpy as np

from kvstore.client._wire import batches, block_slices, error_from_status, received
from kvstore.errors import Unavailable
from kvstore.ingest import PutResult
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.dataplane import MAGIC, PREAMBLE, Trailer, read_trailer, recv_exact, send_views

_STATUS = {code.value[0]: code for code in grpc.StatusCode}
RECEIVE_PART = 16 << 20  # bytes received before the blocks so far go to be decoded
Arrived = Callable[[list[tuple[np.ndarray, pb.BlockMeta]]], None]


class Unreachable(Unavailable):
    """The data port could not be reached: the caller may fall back to gRPC."""


class DataConnections:
    """Idle TCP connections per data-plane address, reused across transfers."""

    def __init__(self, timeout: float | None, grpc_host: str) -> None:
        self.timeout = timeout
        self.grpc_host = grpc_host
        self._idle: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def connection(self, address: str) -> Iterator[socket.socket]:
        """A connection to `address`; pooled again only if the transfer ended cleanly."""
        with self._lock:
            idle = self._idle.get(address)
            sock = idle.pop() if idle else None
        if sock is not None and _closed_by_peer(sock):
            sock.close()
            sock = None
        if sock is None:
            sock = self._connect(address)
        try:
            yield sock
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._idle.setdefault(address, []).append(sock)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()

    def _connect(self, address: str) -> socket.socket:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if host in ("0.0.0.0", "::", ""):  # the node bound every interface: use the one we dialed
            host = self.grpc_host
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.timeout or 30)
        except OSError as exc:
            raise Unreachable(f"data plane {address} unreachable: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle pooled connection that is readable has been closed (or broken) by the node."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def send_put(conns: DataConnections, ticket: pb.Ticket, views: Sequence[memoryview]) -> PutResult:
    """Send the payloads a Put ticket asks for; the trailer says what was stored."""
    present = set(ticket.present)
    wanted = [v for i, v in enumerate(views) if i not in present]
    if not wanted:
        return PutResult(0, len(views))
    with conns.connection(ticket.data_address) as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id))
        send_views(sock, wanted)  # no copy: straight from the caller's arrays
        trailer = _checked(read_trailer(sock))
    return PutResult(trailer.stored, trailer.existed)


def receive_get(
    conns: DataConnections,
    ticket: pb.Ticket,
    out: memoryview | np.ndarray | None,
    verify: bool,
    arrived: Arrived | None = None,
) -> list[tuple[np.ndarray, pb.BlockMeta]]:
    """Receive a Get ticket's blocks into one buffer (or `out`), each straight into place.
    With `arrived`, blocks go to it in parts of `RECEIVE_PART` bytes as they land."""
    if not ticket.blocks:
        return []
    span, blocks = block_slices(ticket.blocks, out)
    sizes = [h.meta.size for h in ticket.blocks]
    parts = batches(sizes, RECEIVE_PART) if arrived else [slice(0, len(sizes))]
    with conns.connection(ticket.data_address) as sock:
        sock.sendall(PREAMBLE.pack(MAGIC, ticket.id))
        start = 0
        for part in parts:
            end = start + sum(sizes[part])
            recv_exact(sock, memoryview(span)[start:end])  # one copy: kernel -> destination
            start = end
            if arrived:
                arrived(received(blocks[part], ticket.blocks[part], verify))
        _checked(read_trailer(sock))
    return received(blocks, ticket.blocks, verify and not arrived)


def _checked(trailer: Trailer) -> Trailer:
    if trailer.status:
        code = _STATUS.get(trailer.status, grpc.StatusCode.UNKNOWN)
        raise error_from_status(code, trailer.message)
    return trailer
