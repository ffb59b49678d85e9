"""Tenants: who may do what, in which key space, within which quota.

An auth file lists tenants (TOML: a `secret`, then `[[tenant]]` tables: `name`, `token`,
`quota`, `read_only`, `shm`, `push`, `admin`). Each tenant's keys live in a key space of
their own: the node stores a keyed one-way digest of each key, keyed by the file's
`secret` and the tenant's name. The secret never leaves the node side, so no tenant can
compute another's node keys, nor turn a node key it saw anywhere (Redis, KV events)
into a request that reaches it; and no answer a tenant gets names a node key. Admin
tenants (and nodes of the cluster, `node_tenant`) see the node's raw key space.

Quotas count the bytes of the blocks a tenant stored; over its quota, a tenant's own
least recently used blocks go, never another's.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.config import parse_size
from kvstore.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from kvstore.keys import KEY_BYTES, BlockKey
from kvstore.meta import BlockMeta
from kvstore.store import Store

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "token": str, "quota": (str, int), "read_only": bool, "shm": bool,
    "push": bool, "admin": bool,
}  # fmt: skip
MIN_SECRET = 32  # characters of the auth file's `secret`
Header = tuple[BlockKey, BlockMeta]


@dataclass(frozen=True)
class Tenant:
    name: str
    token: str = field(repr=False, default="")
    quota: int = 0  # bytes; 0: none but the node's
    read_only: bool = False
    shm: bool = False  # may map the node's whole arena (every tenant's bytes): trusted only
    push: bool = False  # may ask the node to send blocks to another node
    admin: bool = False
    space: bytes = field(repr=False, default=b"")  # key of its key space; b"": the raw one

    def keys(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """The node's keys for this tenant's: a keyed one-way digest, never inverted (an
        answer names the tenant's own keys, by position)."""
        if not self.space:
            return list(keys)
        base = hashlib.blake2b(key=self.space, digest_size=KEY_BYTES, person=b"kvstore-key")
        mapped = []
        for key in keys:
            digest = base.copy()
            digest.update(key)
            mapped.append(digest.digest())
        return mapped

    def blocks(self, blocks: Iterable[Header]) -> list[Header]:
        """Blocks a tenant names (a put's headers) under the node's keys."""
        blocks = list(blocks)
        return list(zip(self.keys([k for k, _ in blocks]), (m for _, m in blocks), strict=True))

    def may_write(self) -> None:
        if self.read_only:
            raise PermissionDenied(f"tenant {self.name!r} is read-only")

    def may_push(self) -> None:
        self.may_write()
        if not self.push:
            raise PermissionDenied(f"tenant {self.name!r} may not push (push = true grants it)")

    def may_see_all(self, what: str) -> None:
        if not self.admin:
            raise PermissionDenied(f"{what} shows every tenant's blocks: admin tenants only")


OPEN = Tenant("", shm=True, push=True, admin=True)  # no auth file: everyone, the raw key space


def node_tenant(data_token: str) -> Tenant:
    """Another node of the cluster, proven by the cluster's secret: the raw key space (it
    fetches and pushes node keys), no shared memory, no pushing on from here."""
    return Tenant("(node)", token=data_token, admin=True)


def as_asked(
    asked: Sequence[BlockKey], blocks: Iterable[tuple[BlockKey, BlockMeta]]
) -> list[Header]:
    """Found blocks, a prefix of `asked` (the caller's keys), under the caller's keys."""
    return [(key, meta) for key, (_, meta) in zip(asked, blocks, strict=False)]


class Tenants:
    """The tenants of an auth file, found by token; `load` again to pick up changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._by_token: dict[bytes, Tenant] = {}
        self.load()

    def load(self) -> None:
        """Read the file; on any error the tenants known before stay, and it raises."""
        try:
            data = tomllib.loads(self.path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"auth file {self.path}: {exc}") from None
        by_token = _parse(data, str(self.path))
        self._by_token = by_token

    def __iter__(self):
        return iter(self._by_token.values())

    def find(self, token: str | None) -> Tenant:
        if not token:
            raise Unauthenticated("no token: pass token= (or set KVSTORE_TOKEN)")
        tenant = self._by_token.get(_digest(token))
        if tenant is None or not hmac.compare_digest(tenant.token, token):
            raise Unauthenticated("token unknown")
        return tenant


def _parse(data: dict, where: str) -> dict[bytes, Tenant]:
    unknown = set(data) - {"tenant", "secret"}
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (tenant, secret)")
    secret = data.get("secret", "")
    if not isinstance(secret, str) or len(secret) < MIN_SECRET:
        raise ValueError(
            f"{where}: secret: a string of at least {MIN_SECRET} characters is required (it "
            "keys every tenant's key space; the same on every node of a cluster; e.g. "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    entries = data.get("tenant", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: no [[tenant]] tables")
    by_token: dict[bytes, Tenant] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: tenant[{i}]"
        for key, value in entry.items():
            if key not in _FIELDS:
                raise ValueError(f"{at}.{key}: unknown key ({', '.join(_FIELDS)})")
            if not isinstance(value, _FIELDS[key]):
                raise ValueError(f"{at}.{key}: wrong type {type(value).__name__}")
        name, token = entry.get("name", ""), entry.get("token", "")
        if not name or name in names:
            raise ValueError(f"{at}.name: {'repeated' if name else 'missing'}")
        if len(token) < 16:
            raise ValueError(f"{at}.token: at least 16 characters")
        if _digest(token) in by_token:
            raise ValueError(f"{at}.token: the same as another tenant's")
        try:
            quota = parse_size(entry.get("quota", 0))
        except ValueError as exc:
            raise ValueError(f"{at}.quota: {exc}") from None
        admin, read_only, shm = (entry.get(k, False) for k in ("admin", "read_only", "shm"))
        if read_only and shm:
            raise ValueError(
                f"{at}: read_only and shm together: shared memory maps the arena writable, "
                "so a read-only tenant cannot have it"
            )
        names.add(name)
        by_token[_digest(token)] = Tenant(
            name=name,
            token=token,
            quota=quota,
            read_only=read_only,
            shm=shm,
            push=entry.get("push", False),
            admin=admin,
            space=b"" if admin else _space(secret, name),
        )
    return by_token


def _digest(token: str) -> bytes:
    return hashlib.blake2b(token.encode(), digest_size=16).digest()


def _space(secret: str, name: str) -> bytes:
    """The key of a tenant's key space: the node side's secret and the tenant's name."""
    return hashlib.blake2b(
        name.encode(), key=hashlib.blake2b(secret.encode()).digest(), digest_size=32,
        person=b"kvstore-space",
    ).digest()  # fmt: skip


class Quotas:
    """What each tenant holds (bytes, in least-recently-used order), counted against its
    quota. Blocks a tenant put or read are its own (namespaces make them so); blocks
    that came in otherwise (fetched, pushed, recovered from disk) are nobody's until a
    tenant reads one. Blocks that leave the node (evicted, deleted) are forgotten."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: dict[str, OrderedDict[BlockKey, int]] = {}
        self._bytes: dict[str, int] = {}
        self._owner: dict[BlockKey, str] = {}
        self.evicted: dict[str, int] = {}  # blocks deleted past each tenant's quota
        self._lock = threading.Lock()
        store.watch(self._changed)

    def check(self, tenant: Tenant, nbytes: int) -> None:
        """Refuse a put that could not fit the tenant's quota even alone."""
        if tenant.quota and nbytes > tenant.quota:
            raise ResourceExhausted(
                f"a put of {nbytes} bytes: tenant {tenant.name!r} has a quota of {tenant.quota}"
            )

    def charge(self, tenant: Tenant, blocks: Iterable[tuple[BlockKey, int]]) -> None:
        """The tenant stored or read `blocks` (node keys, sizes): its warmest now. Past its
        quota, its coldest other blocks are deleted from the node."""
        if tenant.admin:
            return  # the raw key space: nodes' own traffic, the operator's
        with self._lock:
            held = self._held.setdefault(tenant.name, OrderedDict())
            total = self._bytes.get(tenant.name, 0)
            fresh: set[BlockKey] = set()
            for key, size in blocks:
                if self._owner.setdefault(key, tenant.name) != tenant.name:
                    continue  # another's: cannot be, namespaces differ; never charged
                total += size - held.pop(key, 0)
                held[key] = size
                fresh.add(key)
            victims: list[BlockKey] = []
            for key in list(held) if tenant.quota else ():
                if total <= tenant.quota:
                    break
                if key not in fresh:
                    total -= held.pop(key)
                    del self._owner[key]
                    victims.append(key)
            self._bytes[tenant.name] = total
            if victims:
                self.evicted[tenant.name] = self.evicted.get(tenant.name, 0) + len(victims)
        if victims:
            self.store.delete(victims)

    def usage(self, tenant: Tenant) -> tuple[int, int]:
        """(blocks, bytes) the tenant holds."""
        with self._lock:
            return len(self._held.get(tenant.name, ())), self._bytes.get(tenant.name, 0)

    def all_usage(self) -> dict[str, tuple[int, int]]:
        """(blocks, bytes) of every tenant that holds or held something."""
        with self._lock:
            return {name: (len(held), self._bytes[name]) for name, held in self._held.items()}

    def _changed(self, tier: str, stored: list[BlockKey], removed: list[BlockKey]) -> None:
        gone = [k for k in removed if k in self._owner and not self.store.contains(k)]
        with self._lock:
            for key in gone:
                name = self._owner.pop(key, None)
                if name is not None:
                    self._bytes[name] -= self._held[name].pop(key)
