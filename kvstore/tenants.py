"""Tenants: who may do what, in which key space, within which quota.

An auth file lists tenants (TOML, `[[tenant]]` tables: `name`, `token`, `quota`,
`read_only`, `shm`, `admin`). Each tenant's keys live in a namespace of their own: the
node stores `key XOR pad`, the pad a digest of a secret (the file's `secret`, else the
tenant's token), so no tenant can name, and so neither read, find, overwrite nor
delete, a block of another. Admin tenants see the node's raw key space: every tenant's
blocks, events and statistics; nodes use an admin token to fetch and push between them.

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

import numpy as np

from kvstore.config import parse_size
from kvstore.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from kvstore.keys import KEY_BYTES, BlockKey
from kvstore.meta import BlockMeta
from kvstore.store import Store

_FIELDS = {"name": str, "token": str, "quota": (str, int), "read_only": bool, "shm": bool,
           "admin": bool}  # fmt: skip
_NO_PAD = bytes(KEY_BYTES)
Header = tuple[BlockKey, BlockMeta]


@dataclass(frozen=True)
class Tenant:
    name: str
    token: str = field(repr=False, default="")
    quota: int = 0  # bytes; 0: none but the node's
    read_only: bool = False
    shm: bool = False  # may map the node's whole arena (every tenant's bytes): trusted only
    admin: bool = False
    pad: bytes = field(repr=False, default=_NO_PAD)

    def keys(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """The node's keys for this tenant's (and back: XOR is its own inverse)."""
        if self.pad == _NO_PAD or not keys:
            return list(keys)
        words = np.frombuffer(b"".join(keys), np.uint64).reshape(-1, 2) ^ np.frombuffer(
            self.pad, np.uint64
        )
        raw = words.tobytes()
        return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]

    def blocks(self, blocks: Iterable[Header]) -> list[Header]:
        blocks = list(blocks)
        return list(zip(self.keys([k for k, _ in blocks]), (m for _, m in blocks), strict=True))

    def may_write(self) -> None:
        if self.read_only:
            raise PermissionDenied(f"tenant {self.name!r} is read-only")

    def may_see_all(self, what: str) -> None:
        if not self.admin:
            raise PermissionDenied(f"{what} shows every tenant's blocks: admin tenants only")


OPEN = Tenant("", shm=True, admin=True)  # no auth file: everyone, in the raw key space


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

    def admin_token(self) -> str:
        """A token nodes present to each other (the first admin tenant's), or ''."""
        return next((t.token for t in self if t.admin), "")

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
    if not isinstance(secret, str):
        raise ValueError(f"{where}: secret must be a string")
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
        admin = entry.get("admin", False)
        names.add(name)
        by_token[_digest(token)] = Tenant(
            name=name,
            token=token,
            quota=quota,
            read_only=entry.get("read_only", False),
            shm=entry.get("shm", False),
            admin=admin,
            pad=_NO_PAD if admin else _pad(secret or token, name),
        )
    return by_token


def _digest(token: str) -> bytes:
    return hashlib.blake2b(token.encode(), digest_size=16).digest()


def _pad(secret: str, name: str) -> bytes:
    return hashlib.blake2b(
        name.encode(), key=hashlib.blake2b(secret.encode()).digest(), digest_size=KEY_BYTES,
        person=b"kvstore-ns",
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
