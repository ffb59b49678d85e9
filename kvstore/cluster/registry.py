"""The node registry: one record per live node registration, kept alive by heartbeats.

A record expires with its TTL, so a node that stops heartbeating drops out of
every answer within the TTL, and nobody has to scan for it. Each registration
takes a new slot and bumps the node's incarnation; it deletes the record of the
node's previous slot, so a restarted node's old entries stop counting at once.

Records are signed with the cluster's secret (`sig`, over the node's id,
incarnation, slot, addresses and an expiry `exp` in wall-clock seconds, renewed
by every heartbeat), and readers drop a record that fails it: writing Redis
cannot register a node, nor replay an old record past its expiry. A record that does not
decode (its unsigned `tiers` or `load` malformed, say, by a buggy node) is passed over
too, as if absent, and logged once: one bad record never fails a read of the others.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from kvstore.cluster.connection import Client
from kvstore.cluster.layout import Layout
from kvstore.cluster.scripts import DEREGISTER, HEARTBEAT, REGISTER
from kvstore.results import Load
from kvstore.trust import ClusterSecret

log = logging.getLogger("kvstore.cluster")
RECORD = b"node-record"  # what a record's MAC is for (kvstore/trust.py)
SKEW = 30.0  # seconds a signed record outlives its TTL: clocks of nodes and routers differ
MAX_REPORTED = 1024  # bad records remembered as logged already (then forgotten, logged again)
Number = TypeVar("Number", int, float)


class BadRecord(ValueError):
    """A node record, or one of its fields, that does not decode."""


@dataclass(frozen=True, slots=True)
class TierUsage:
    name: str
    capacity: int  # bytes
    used: int  # bytes
    blocks: int


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """What a node reports at every heartbeat."""

    tiers: tuple[TierUsage, ...] = ()
    load: Load = field(default_factory=Load)

    def fields(self) -> dict[bytes, str]:
        tiers = [[t.name, t.capacity, t.used, t.blocks] for t in self.tiers]
        load = [self.load.inflight, self.load.bytes_per_s]
        return {b"tiers": json.dumps(tiers), b"load": json.dumps(load)}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    incarnation: int
    address: str  # gRPC
    data_address: str  # raw TCP data plane; empty if none
    usage: NodeUsage

    @classmethod
    def decode(cls, raw: Mapping[bytes, bytes]) -> NodeRecord:
        """A record as stored; check `trusted` first. BadRecord if it does not decode."""
        tiers = []
        for tier in _json_list(raw.get(b"tiers") or b"[]", "tiers"):
            name, capacity, used, blocks = _json_list(tier, "tiers", 4)
            if not isinstance(name, str):
                raise BadRecord(f"tiers: a tier named {name!r}")
            tiers.append(
                TierUsage(name, *(_number(n, "tiers", int) for n in (capacity, used, blocks)))
            )
        try:
            incarnation = int(raw[b"inc"])
            node_id, address, data = (raw[f].decode() for f in (b"id", b"addr", b"data"))
        except KeyError as exc:
            raise BadRecord(f"no {exc.args[0].decode()}") from None
        except ValueError as exc:  # a non-integer incarnation, a name that is not UTF-8
            raise BadRecord(str(exc)) from None
        usage = NodeUsage(tuple(tiers), decode_load(raw.get(b"load")))
        return cls(node_id, incarnation, address, data, usage)


def decode_load(raw: bytes | None) -> Load:
    """A load as `NodeUsage.fields` wrote it (none: no load); BadRecord if it is not that."""
    if not raw:
        return Load()
    inflight, rate = _json_list(raw, "load", 2)
    return Load(_number(inflight, "load", int), _number(rate, "load", float))


def _json_list(raw: object, name: str, size: int | None = None) -> list:
    """A JSON list (of `size` items), decoded if `raw` is bytes; else BadRecord."""
    try:
        value = json.loads(raw) if isinstance(raw, bytes) else raw
    except ValueError as exc:
        raise BadRecord(f"{name}: not JSON ({exc})") from None
    if not isinstance(value, list) or (size is not None and len(value) != size):
        raise BadRecord(f"{name}: {str(value)[:100]!r} is not a list of {size or 'any'} items")
    return value


def _number(value: object, name: str, kind: type[Number]) -> Number:
    """A JSON number as `kind` (an int only if whole), finite; else BadRecord."""
    if isinstance(value, float) and math.isfinite(value) and (kind is float or value.is_integer()):
        return kind(value)
    if isinstance(value, int) and not isinstance(value, bool) and (kind is int or value < 2**1000):
        return kind(value)
    raise BadRecord(f"{name}: {str(value)[:100]!r} is not a number of the kind it must be")


_reported: set[tuple[str, bytes | None]] = set()
_reported_lock = threading.Lock()


def passed_over(slot: int | bytes, node_id: bytes | None, exc: Exception) -> None:
    """Log, once per record, that a record read from Redis does not decode and is left out
    (as if absent) of every answer."""
    record = (slot.decode(errors="replace") if isinstance(slot, bytes) else str(slot), node_id)
    with _reported_lock:
        if record in _reported:
            return
        if len(_reported) >= MAX_REPORTED:
            _reported.clear()
        _reported.add(record)
    log.warning(
        "cluster index: the record of node %r (slot %s) does not decode and is left out: %s",
        node_id[:100] if node_id else node_id, record[0][:20], exc,
    )  # fmt: skip


def trusted(
    secret: ClusterSecret,
    slot: int | bytes,
    node_id: bytes | None,
    incarnation: bytes | None,
    address: bytes | None,
    data_address: bytes | None,
    expires: bytes | None,
    sig: bytes | None,
) -> bool:
    """Whether a record read from Redis was signed with the cluster's secret and has not
    expired (a field missing, or anything malformed, is not)."""
    if None in (node_id, incarnation, address, data_address, expires, sig):
        return False
    try:
        if int(expires) < time.time():  # type: ignore[arg-type]
            return False
        mac = bytes.fromhex(sig.decode())  # type: ignore[union-attr]
    except ValueError:
        return False
    fields = (node_id, incarnation, slot, address, data_address, expires)
    return secret.accepts(mac, RECORD, *fields) is not None  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Registration:
    slot: int
    incarnation: int
    token: str  # random: tells this registration's record from a later one under the same slot
    previous_slot: int | None  # the node's slot before this one, if Redis remembered it
    node: tuple[str, str, str] = ("", "", "")  # id, address, data address: what is signed


class Registry:
    def __init__(self, redis: Client, layout: Layout, secret: ClusterSecret) -> None:
        self._redis = redis
        self._layout = layout
        self._secret = secret
        self._register = redis.register_script(REGISTER)
        self._heartbeat = redis.register_script(HEARTBEAT)
        self._deregister = redis.register_script(DEREGISTER)

    def register(
        self, node_id: str, address: str, data_address: str, usage: NodeUsage, ttl_ms: int
    ) -> Registration:
        """A new slot and incarnation for `node_id`; its previous record stops counting now."""
        lay = self._layout
        token = secrets.token_hex(8)
        record = {b"id": node_id, b"addr": address, b"data": data_address, b"tok": token}
        slot, incarnation, previous = self._register(
            keys=[lay.incarnations, lay.slots, lay.ids],
            args=[node_id, ttl_ms, lay.node_prefix, *_flat({**record, **usage.fields()})],
        )
        reg = Registration(
            slot, incarnation, token, int(previous) if previous else None,
            (node_id, address, data_address),
        )  # fmt: skip
        self.heartbeat(reg, usage, ttl_ms)  # signs it: until then, readers pass it over
        return reg

    def heartbeat(self, reg: Registration, usage: NodeUsage, ttl_ms: int) -> bool:
        """Refresh the record's TTL, usage and signature; False if the record is gone
        (register again)."""
        expires = int(time.time() + ttl_ms / 1000 + SKEW)
        node_id, address, data_address = reg.node
        fields = (node_id, reg.incarnation, reg.slot, address, data_address, expires)
        sig = self._secret.mac(RECORD, *fields).hex()  # as `trusted` checks it
        signed = {b"exp": str(expires), b"sig": sig}
        args = [reg.token, ttl_ms, *_flat({**usage.fields(), **signed})]
        return bool(self._heartbeat(keys=[self._layout.node(reg.slot)], args=args))

    def deregister(self, reg: Registration) -> None:
        self._deregister(keys=[self._layout.node(reg.slot)], args=[reg.token])

    def live_nodes(self) -> list[NodeRecord]:
        """Every node whose current registration is alive and signed, by node id."""
        # redis-py types replies as bytes | str; this client's are bytes (no decode_responses)
        slots: list[bytes] = list(self._redis.hgetall(self._layout.ids).values())  # type: ignore[arg-type]
        pipe = self._redis.pipeline(transaction=False)
        for slot in slots:
            pipe.hgetall(self._layout.node(slot))
        records = []
        for slot, raw in zip(slots, pipe.execute(), strict=True):
            if not raw or not trusted(self._secret, slot, *(raw.get(f) for f in SIGNED_FIELDS)):
                continue
            try:
                records.append(NodeRecord.decode(raw))
            except BadRecord as exc:  # a buggy node's: as if absent
                passed_over(slot, raw.get(b"id"), exc)
        return sorted(records, key=lambda r: r.node_id)


SIGNED_FIELDS = (b"id", b"inc", b"addr", b"data", b"exp", b"sig")  # as `trusted` takes them


def _flat(fields: Mapping[bytes, str]) -> list[bytes | str]:
    return [x for pair in fields.items() for x in pair]
