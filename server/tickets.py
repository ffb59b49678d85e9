"""Channel tickets: single-use, short-lived, bound to the host that asked for one.

gRPC hands them out (`Hello`); a data-plane connection presents one to open, so a
connection is only ever opened by a caller that got through the gRPC front door
(and, with tenants, binds to what that caller may do).
"""

from __future__ import annotations

import os
import threading
import time

from kvstore.errors import Unauthenticated


class TicketBook:
    """Issued tickets until redeemed or expired; expired ones are swept as new ones come."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._tickets: dict[bytes, tuple[str, float]] = {}  # id -> (host, expiry)
        self._lock = threading.Lock()

    def issue(self, host: str) -> bytes:
        ticket = os.urandom(16)
        now = time.monotonic()
        with self._lock:
            if len(self._tickets) > 1024:  # forgotten ones: drop the expired
                self._tickets = {t: v for t, v in self._tickets.items() if v[1] >= now}
            self._tickets[ticket] = (host, now + self.ttl)
        return ticket

    def redeem(self, ticket: bytes, host: str | None) -> None:
        """Take a ticket out of the book: it cannot be used twice. `host` None: the caller
        is on this host (a Unix socket), wherever it dialed gRPC from."""
        with self._lock:
            issued = self._tickets.pop(ticket, None)
        if issued is None or issued[1] < time.monotonic():
            raise Unauthenticated("ticket unknown, already used, or expired")
        if host is not None and issued[0] != host:
            raise Unauthenticated(f"ticket was issued to {issued[0]}, not {host}")
