"""Cluster trust: the secret that a cluster's nodes and routers share, and what it proves.

One secret file (`--cluster-secret`), the same on every node and router of a cluster:
one secret a line (at least 32 characters), `#` comments. The first secret signs and
proves; every secret in the file is accepted, so a secret rotates without a pause: add
the new one as the second line everywhere, then move it first everywhere, then drop
the old one (each step a SIGHUP, or a restart).

- A node proves itself to whoever dialed it (`prove`): a MAC of the caller's challenge,
  the address the caller dialed, and the node's id and instance. Because the dialed
  address is in it, a process that relays a challenge to a real node gets a proof for
  the real node's address, never for its own, and is never sent a credential.
- A node calls a peer it has proven with a credential bound to that peer's instance
  (`credential`): no use at any other node, nor once the peer restarts.
- Registry records in Redis are signed with the node's incarnation and an expiry
  (`sign`), so write access to Redis cannot register a node.

The MACs are keyed BLAKE2b (a MAC by design), each purpose with its own personalisation.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from pathlib import Path

MIN_SECRET = 32  # characters
NODE_SCHEME = "Node "  # gRPC `authorization` metadata of a node calling a node
CHALLENGE, DIALED = "kvstore-challenge", "kvstore-dialed"  # metadata of a node's first Hello


def _field(value: bytes | str | int) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode()
    return len(raw).to_bytes(4, "big") + raw  # lengths first: fields never run together


class ClusterSecret:
    """The cluster's secrets, first the one in use; `load` again to rotate (the list is
    replaced whole, so readers on other threads see the old or the new one)."""

    def __init__(self, secrets: Sequence[str], path: str = "") -> None:
        self.path = path
        self._keys = _keys(secrets, path or "cluster secret")  # replaced whole by `load`

    @classmethod
    def read(cls, path: str | Path) -> ClusterSecret:
        return cls(_read(path), str(path))

    @property
    def count(self) -> int:
        return len(self._keys)

    def load(self) -> None:
        """Read the file again; on any error the secrets stay as they were, and it raises."""
        self._keys = _keys(_read(self.path), self.path)

    def mac(self, purpose: bytes, *fields: bytes | str | int) -> bytes:
        """A MAC of `fields` for `purpose`, with the secret in use."""
        return _mac(self._keys[0], purpose, fields)

    def accepts(self, mac: bytes, purpose: bytes, *fields: bytes | str | int) -> int | None:
        """The position of the secret `mac` was made with, or None for none of them."""
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(mac, _mac(key, purpose, fields)):
                return i
        return None

    # -- what the daemon, the client and the registry ask of it

    def prove(self, challenge: bytes, dialed: str, node_id: str, instance: str) -> bytes:
        return self.mac(b"node-proof", challenge, dialed, node_id, instance)

    def proven(
        self, proof: bytes, challenge: bytes, dialed: str, node_id: str, instance: str
    ) -> bool:
        return self.accepts(proof, b"node-proof", challenge, dialed, node_id, instance) is not None

    def credential(self, instance: str) -> str:
        """The `authorization` value a node calls the peer of `instance` with."""
        return NODE_SCHEME + self.mac(b"node-call", instance).hex()

    def caller(self, credential: str, instance: str) -> int | None:
        """Which secret a node's `credential` for this node (`instance`) was made with."""
        try:
            mac = bytes.fromhex(credential.removeprefix(NODE_SCHEME))
        except ValueError:
            return None
        return self.accepts(mac, b"node-call", instance)

    def data_token(self, which: int = 0) -> str:
        """What a node proves its data-plane tickets with (never sent itself)."""
        return _mac(self._keys[which], b"node-data", ()).hex()


def _read(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cluster secret {path}: {exc.strerror or exc}") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s and s[0] != "#"]


def _keys(secrets: Sequence[str], where: str) -> list[bytes]:
    if not secrets:
        raise ValueError(f"{where}: no secret in it (one a line, at least {MIN_SECRET} characters)")
    for i, secret in enumerate(secrets):
        if len(secret) < MIN_SECRET:
            raise ValueError(f"{where}: secret {i + 1} is shorter than {MIN_SECRET} characters")
    return [
        hashlib.blake2b(s.encode(), digest_size=32, person=b"kvstore-cluster").digest()
        for s in secrets
    ]


def _mac(key: bytes, purpose: bytes, fields: Sequence[bytes | str | int]) -> bytes:
    message = b"".join(_field(f) for f in fields)
    return hashlib.blake2b(message, key=key, digest_size=16, person=purpose[:16]).digest()
