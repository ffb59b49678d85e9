"""Transfer tickets: single-use, short-lived, bound to one host and one exact transfer."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from kvstore.errors import Unauthenticated
from kvstore.ingest import BlockIngest, SlotPut
from kvstore.store import ReadBatch


@dataclass
class Ticket:
    id: bytes
    host: str  # the address that asked for it; only it may redeem it
    expires: float
    put: BlockIngest | SlotPut | None = None
    get: ReadBatch | None = None

    def cancel(self) -> None:
        """Release what the ticket holds: a Put's reservations, a Get's pins."""
        if self.put is not None:
            self.put.abort()
        if self.get is not None:
            self.get.close()


class TicketBook:
    """Issued tickets until redeemed or expired; expired ones are swept in the background."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="kvstore-tickets", daemon=True)
        self._sweeper.start()

    def issue(
        self,
        host: str,
        *,
        put: BlockIngest | SlotPut | None = None,
        get: ReadBatch | None = None,
    ) -> Ticket:
        ticket = Ticket(os.urandom(16), host, time.monotonic() + self.ttl, put, get)
        with self._lock:
            self._tickets[ticket.id] = ticket
        return ticket

    def redeem(self, ticket_id: bytes, host: str) -> Ticket:
        """Take a ticket out of the book: it cannot be used twice."""
        with self._lock:
            ticket = self._tickets.get(ticket_id)
            if ticket is None or ticket.expires < time.monotonic():
                raise Unauthenticated("ticket unknown, already used, or expired")
            if ticket.host != host:
                raise Unauthenticated(f"ticket was issued to {ticket.host}, not {host}")
            del self._tickets[ticket_id]
        return ticket

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            tickets, self._tickets = list(self._tickets.values()), {}
        for ticket in tickets:
            ticket.cancel()

    def _sweep(self) -> None:
        while not self._closed.wait(max(min(self.ttl / 2, 1.0), 0.05)):
            now = time.monotonic()
            with self._lock:
                expired = [t for t in self._tickets.values() if t.expires < now]
                for ticket in expired:
                    del self._tickets[ticket.id]
            for ticket in expired:
                ticket.cancel()
