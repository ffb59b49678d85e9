"""Who is calling: the tenant of a gRPC call's token (metadata `authorization: Bearer
TOKEN`), another node of the cluster (`authorization: Node ...`, made with the cluster's
secret for this node's instance), or the tenant of a data connection's ticket; and what
the node counts against its quota. Without an auth file every tenant caller is `OPEN`:
the raw key space, no quota."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from kvstore.errors import Unauthenticated
from kvstore.keys import BlockKey
from kvstore.store import Store
from kvstore.tenants import OPEN, Quotas, Tenant, Tenants, node_tenant
from kvstore.trust import NODE_SCHEME, ClusterSecret

log = logging.getLogger("kvstore.server")


class Auth:
    def __init__(
        self, path: str, store: Store, cluster: ClusterSecret | None = None, instance: str = ""
    ) -> None:
        self.tenants = Tenants(path) if path else None
        self.quotas = Quotas(store) if path else None
        self.cluster = cluster
        self.instance = instance  # this run's: what node credentials for it are bound to
        self.reads: dict[str, list[int]] = {}  # tenant -> [blocks asked for, blocks served]
        self.revoked: list[Callable[[Callable[[Tenant], bool]], None]] = []  # see reload
        self._lock = threading.Lock()

    @property
    def on(self) -> bool:
        return self.tenants is not None

    def caller(self, metadata: Iterable[tuple[str, str | bytes]]) -> Tenant:
        """The tenant (or node) a call's metadata proves; Unauthenticated if none."""
        credential = ""
        for key, value in metadata:
            if key == "authorization":
                credential = str(value)
        if credential.startswith(NODE_SCHEME):
            return self.node(credential)
        if self.tenants is None:
            return OPEN
        return self.tenants.find(credential.removeprefix("Bearer "))

    def node(self, credential: str) -> Tenant:
        """Another node of the cluster, if its credential was made with the cluster's secret
        for this very run of this node."""
        which = self.cluster.caller(credential, self.instance) if self.cluster else None
        if which is None:
            raise Unauthenticated(
                "node credential not accepted: not made with this cluster's secret"
            )
        return node_tenant(self.cluster.data_token(which))  # type: ignore[union-attr]

    def reload(self) -> None:
        """Read the auth file and the cluster's secret again (SIGHUP); a broken file leaves
        what it held as it was. Connections and tickets of tenants removed or changed are
        ended (`revoked`); nodes' are ended when the secret they proved changed."""
        before = set(self.tenants) if self.tenants is not None else set()
        sources = (
            ("auth file", self.tenants, "tenants"),
            ("cluster secret", self.cluster, "secrets"),
        )
        for what, source, unit in sources:
            if source is None:
                continue
            try:
                source.load()
                count = source.count if isinstance(source, ClusterSecret) else len(list(source))
                log.info("%s %s reloaded: %d %s", what, source.path, count, unit)
            except ValueError as exc:
                log.error("%s %s not reloaded (%s): it stays as it was", what, source.path, exc)
        now = set(self.tenants) if self.tenants is not None else set()
        if before == now and self.cluster is None:
            return

        def still(tenant: Tenant) -> bool:
            if tenant.name == node_tenant("").name:
                return self.cluster is not None and any(
                    tenant.token == self.cluster.data_token(i) for i in range(self.cluster.count)
                )
            return tenant is OPEN or tenant in now

        for revoke in self.revoked:
            revoke(still)

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
