"""Channel tickets: single-use, short-lived, bound to the host that asked for one.

gRPC hands them out (`Hello`); a data-plane connection presents one to open, so a
connection is only ever opened by a caller that got through the gRPC front door
(and, with tenants, binds to what that caller may do).
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Callable

from kvstore.errors import Unauthenticated
from kvstore.proto.channel import ticket_proof
from kvstore.tenants import Tenant


class TicketBook:
    """Issued tickets until redeemed or expired; expired ones are swept as new ones come."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._tickets: dict[bytes, tuple[str, float, Tenant]] = {}  # id -> (host, expiry, tenant)
        self._lock = threading.Lock()

    def issue(self, host: str, tenant: Tenant) -> bytes:
        ticket = os.urandom(16)
        now = time.monotonic()
        with self._lock:
            if len(self._tickets) > 1024:  # forgotten ones: drop the expired
                self._tickets = {t: v for t, v in self._tickets.items() if v[1] >= now}
            self._tickets[ticket] = (host, now + self.ttl, tenant)
        return ticket

    def revoke(self, still: Callable[[Tenant], bool]) -> None:
        """Forget the tickets of callers no longer allowed (an auth reload)."""
        with self._lock:
            self._tickets = {t: v for t, v in self._tickets.items() if still(v[2])}

    def outstanding(self) -> int:
        """Tickets issued and neither redeemed nor expired."""
        now = time.monotonic()
        with self._lock:
            return sum(expiry >= now for _, expiry, _ in self._tickets.values())

    def redeem(self, ticket: bytes, host: str | None, proof: bytes) -> Tenant:
        """Take a ticket out of the book (it cannot be used twice): the tenant it was issued
        to, if `proof` shows the caller holds that tenant's token. `host` None: the caller
        is on this host (a Unix socket), wherever it dialed gRPC from."""
        with self._lock:
            issued = self._tickets.pop(ticket, None)
        if issued is None or issued[1] < time.monotonic():
            raise Unauthenticated("ticket unknown, already used, or expired")
        issued_to, _, tenant = issued
        if host is not None and issued_to != host:
            raise Unauthenticated(f"ticket was issued to {issued_to}, not {host}")
        if not hmac.compare_digest(proof, ticket_proof(ticket, tenant.token)):
            raise Unauthenticated("ticket was issued for another token")
        return tenant
