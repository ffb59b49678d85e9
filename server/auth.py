"""Who is calling: the tenant of a gRPC call's token (metadata `authorization: Bearer
TOKEN`) or of a data connection's ticket, and what the node counts against its quota.
Without an auth file every caller is `OPEN`: the raw key space, no quota."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

import grpc

from kvstore.keys import BlockKey
from kvstore.store import Store
from kvstore.tenants import OPEN, Quotas, Tenant, Tenants

log = logging.getLogger("kvstore.server")


class Auth:
    def __init__(self, path: str, store: Store) -> None:
        self.tenants = Tenants(path) if path else None
        self.quotas = Quotas(store) if path else None
        self.reads: dict[str, list[int]] = {}  # tenant -> [blocks asked for, blocks served]
        self._lock = threading.Lock()

    @property
    def on(self) -> bool:
        return self.tenants is not None

    def of(self, context: grpc.ServicerContext) -> Tenant:
        """The calling tenant; Unauthenticated without a known token."""
        if self.tenants is None:
            return OPEN
        token = ""
        for key, value in context.invocation_metadata():
            if key == "authorization":
                token = str(value).removeprefix("Bearer ")
        return self.tenants.find(token)

    def admin_token(self) -> str:
        return self.tenants.admin_token() if self.tenants is not None else ""

    def reload(self) -> None:
        """Read the auth file again (SIGHUP); a broken one leaves the tenants as they were."""
        if self.tenants is None:
            return
        try:
            self.tenants.load()
            log.info(
                "auth file %s reloaded: %d tenants", self.tenants.path, len(list(self.tenants))
            )
        except ValueError as exc:
            log.error(
                "auth file %s not reloaded (%s): the tenants stay as they were",
                self.tenants.path,
                exc,
            )

    def check(self, tenant: Tenant, nbytes: int) -> None:
        """A put of `nbytes` may start (the tenant may write, and it fits its quota)."""
        tenant.may_write()
        if self.quotas is not None:
            self.quotas.check(tenant, nbytes)

    def charge(self, tenant: Tenant, blocks: Iterable[tuple[BlockKey, int]]) -> None:
        """The tenant stored or read these blocks (node keys, sizes)."""
        if self.quotas is not None:
            self.quotas.charge(tenant, blocks)

    def read(self, tenant: Tenant, asked: int, blocks: Sequence[tuple[BlockKey, int]]) -> None:
        """The tenant asked for `asked` blocks and got `blocks` (the hits; the rest missed)."""
        with self._lock:
            counts = self.reads.setdefault(tenant.name, [0, 0])
            counts[0] += asked
            counts[1] += len(blocks)
        self.charge(tenant, blocks)

    def usage(self, tenant: Tenant) -> tuple[int, int]:
        return self.quotas.usage(tenant) if self.quotas is not None else (0, 0)
