"""The data plane's listener: redeems tickets and moves their bytes over raw TCP.

One thread per connection; the GIL is released inside every recv_into and
sendmsg, so connections run in parallel with each other and with gRPC.
"""

from __future__ import annotations

import logging
import socket
import threading

from kvstore.errors import KVStoreError
from kvstore.proto.dataplane import MAGIC, PREAMBLE, Trailer, recv_exact, send_views
from kvstore.proto.frames import FrameError
from kvstore.server.status import TransferCounts, status_of
from kvstore.server.tickets import Ticket, TicketBook

log = logging.getLogger("kvstore.dataplane")
IDLE_TIMEOUT = 600.0  # a pooled connection may wait this long for its next transfer


class DataPlane:
    def __init__(
        self, address: str, book: TicketBook, timeout: float, transfers: TransferCounts
    ) -> None:
        host, _, port = address.rpartition(":")
        self.book = book
        self.transfers = transfers
        self.timeout = timeout
        self._listener = socket.create_server((host.strip("[]"), int(port)), backlog=128)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, name="kvstore-data", daemon=True)

    def start(self) -> DataPlane:
        self._accepting.start()
        return self

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was closed: stop accepting
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.timeout)
            host = conn.getpeername()[0]
            preamble = memoryview(bytearray(PREAMBLE.size))
            while self._transfer(conn, host, preamble):
                pass
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.info("data connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _transfer(self, conn: socket.socket, host: str, preamble: memoryview) -> bool:
        """One ticket's transfer; False when the connection should close."""
        conn.settimeout(IDLE_TIMEOUT)  # between transfers: the client's pool keeps it open
        try:
            recv_exact(conn, preamble[:1])
        except (ConnectionError, TimeoutError):
            return False  # the client closed or left it idle: a normal end
        conn.settimeout(self.timeout)  # within a transfer, a stall ends it
        recv_exact(conn, preamble[1:])
        magic, ticket_id = PREAMBLE.unpack(preamble)
        try:
            if magic != MAGIC:
                raise FrameError("data plane: bad preamble (expected KVD1 and a ticket id)")
            ticket = self.book.redeem(ticket_id, host)
        except (KVStoreError, FrameError) as exc:
            conn.sendall(Trailer(status_of(exc).value[0], message=str(exc)).encode())
            return False
        try:
            trailer = self._receive(conn, ticket) if ticket.put else self._send(conn, ticket)
        except (KVStoreError, FrameError) as exc:
            conn.sendall(Trailer(status_of(exc).value[0], message=str(exc)).encode())
            return False
        finally:
            ticket.cancel()  # anything not completed is released
        conn.sendall(trailer.encode())
        self.transfers.add("put/tcp" if ticket.put else "get/tcp")
        return True

    @staticmethod
    def _receive(conn: socket.socket, ticket: Ticket) -> Trailer:
        ingest = ticket.put
        while ingest.pending_bytes:
            n = conn.recv_into(ingest.target())  # one copy: socket -> arena slot
            if n == 0:
                raise ConnectionError(f"closed with {ingest.pending_bytes} bytes still due")
            ingest.advance(n)
        result = ingest.finish()
        return Trailer(0, result.stored, result.existed)

    @staticmethod
    def _send(conn: socket.socket, ticket: Ticket) -> Trailer:
        batch = ticket.get
        send_views(conn, [b.view for b in batch.blocks])  # straight from pinned slots
        return Trailer(0)
