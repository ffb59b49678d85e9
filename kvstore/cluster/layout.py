"""Where the cluster index lives in Redis, and how it is encoded.

With the default prefix `kv:`:

    kv:b<16-byte key>  string  one 4-byte word per holder   one per indexed block; no TTL
    {kv:}n:<slot>      hash    id, inc, tok, addr, data, tiers, load, exp, sig   one per
                               registration (signed: registry.py); TTL
    {kv:}ids           hash    node id -> its current slot
    {kv:}inc           hash    node id -> incarnation, bumped at every registration
    {kv:}slot          string  the last slot handed out (INCR)

A word is `slot * 4 + tier code` (kvstore/tiers/registry.py), big-endian: 2^30
registrations per Redis lifetime (the scripts fail loudly past that). A slot
is a small integer naming one registration of one node: a node takes a new
slot whenever it (re)registers, so an entry counts only while the record of its
slot exists. A dead node's record expires with its TTL and a restarted node's
is deleted when it registers again: their entries stop counting at once,
without anyone scanning for them, and are deleted lazily (by readers, and by
the owner's next re-publish). Slot numbers start again at 1 when Redis restarts
empty, so a record also carries a random token, `tok`: a node heartbeats and
writes only while its record holds its token.

A (block, node) entry costs 4 bytes in its block's value, plus its share of the
block's own cost: a dict entry, the 20-byte name (a prefix of up to 3 bytes keeps
its sds in 24 bytes) and the value's object (value embedded up to 44 bytes: 11
holders). Writes rewrite a block's value inside a script, so two nodes never
lose each other's words.

The registry's names share one hash tag, `{kv:}`: with Redis Cluster they live
on one shard, so registering is one atomic script there too, and the registry
is lost or kept as a whole (a lost counter alone would hand out live slots again).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.errors import InvalidArgument
from kvstore.keys import KEY_BYTES, check_key
from kvstore.tiers.registry import TIER_REGISTRY

TIER_CODES = {tier.name: tier.code for tier in TIER_REGISTRY}
TIERS = tuple(sorted(TIER_CODES, key=TIER_CODES.__getitem__))  # by code
# what a locate returns per node (the last three to check its signature)
RECORD_FIELDS = (b"id", b"addr", b"data", b"load", b"inc", b"exp", b"sig")


def words(value: bytes | None) -> dict[int, int]:
    """slot -> tier code of a block's value (what Redis Cluster reads decode here)."""
    return {w >> 2: w & 3 for (w,) in struct.iter_unpack(">I", value or b"")}


def checked_keys(keys: Sequence[object], field: str = "keys") -> list[bytes]:
    """`keys` as 16-byte bytes; InvalidArgument names `keys[i]`. Cheap on the common path
    (exact bytes, no per-key call), which a 512-key locate or store notices."""
    return [
        k if type(k) is bytes and len(k) == KEY_BYTES else check_key(k, f"{field}[{i}]")
        for i, k in enumerate(keys)
    ]


def tier_code(tier: str, field: str = "tier") -> int:
    try:
        return TIER_CODES[tier]
    except (KeyError, TypeError):
        raise InvalidArgument(field, f"expected one of {', '.join(TIERS)}, got {tier!r}") from None


@dataclass(frozen=True, slots=True)
class Layout:
    prefix: bytes = b"kv:"

    def block(self, key: bytes) -> bytes:
        return self.prefix + b"b" + key

    def blocks(self, keys: Sequence[object]) -> list[bytes]:
        prefix = self.prefix + b"b"
        return [prefix + key for key in checked_keys(keys)]

    def node(self, slot: int | bytes) -> bytes:
        return self.node_prefix + (slot if isinstance(slot, bytes) else str(slot).encode())

    @property
    def registry(self) -> bytes:
        return b"{" + self.prefix + b"}"

    @property
    def node_prefix(self) -> bytes:
        return self.registry + b"n:"

    @property
    def ids(self) -> bytes:
        return self.registry + b"ids"

    @property
    def incarnations(self) -> bytes:
        return self.registry + b"inc"

    @property
    def slots(self) -> bytes:
        return self.registry + b"slot"


def layout_for(prefix: str) -> Layout:
    if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
        raise InvalidArgument("prefix", f"must be a non-empty string, no braces: {prefix!r}")
    return Layout(prefix.encode())
