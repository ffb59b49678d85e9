"""The node registry: one record per live node registration, kept alive by heartbeats.

A record expires with its TTL, so a node that stops heartbeating drops out of
every answer within the TTL, and nobody has to scan for it. Each registration
takes a new slot and bumps the node's incarnation; it deletes the record of the
node's previous slot, so a restarted node's old entries stop counting at once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvstore.cluster.connection import Client
from kvstore.cluster.layout import Layout
from kvstore.cluster.scripts import DEREGISTER, HEARTBEAT, REGISTER


@dataclass(frozen=True, slots=True)
class TierUsage:
    name: str
    capacity: int  # bytes
    used: int  # bytes
    blocks: int


@dataclass(frozen=True, slots=True)
class Load:
    inflight: int = 0  # transfers in progress
    bytes_per_s: float = 0.0

    def encode(self) -> str:
        return json.dumps([self.inflight, self.bytes_per_s])

    @classmethod
    def decode(cls, raw: bytes | None) -> Load:
        return cls(*json.loads(raw)) if raw else cls()


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """What a node reports at every heartbeat."""

    tiers: tuple[TierUsage, ...] = ()
    load: Load = field(default_factory=Load)

    def fields(self) -> dict[bytes, str]:
        tiers = [[t.name, t.capacity, t.used, t.blocks] for t in self.tiers]
        return {b"tiers": json.dumps(tiers), b"load": self.load.encode()}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    incarnation: int
    address: str  # gRPC
    data_address: str  # raw TCP data plane; empty if none
    usage: NodeUsage

    @classmethod
    def decode(cls, raw: Mapping[bytes, bytes]) -> NodeRecord:
        tiers = tuple(TierUsage(*t) for t in json.loads(raw.get(b"tiers") or b"[]"))
        return cls(
            node_id=raw[b"id"].decode(),
            incarnation=int(raw[b"inc"]),
            address=raw[b"addr"].decode(),
            data_address=raw[b"data"].decode(),
            usage=NodeUsage(tiers, Load.decode(raw.get(b"load"))),
        )


@dataclass(frozen=True, slots=True)
class Registration:
    slot: int
    incarnation: int
    token: str  # random: tells this registration's record from a later one under the same slot
    previous_slot: int | None  # the node's slot before this one, if Redis remembered it


class Registry:
    def __init__(self, redis: Client, layout: Layout) -> None:
        self._redis = redis
        self._layout = layout
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
        return Registration(slot, incarnation, token, int(previous) if previous else None)

    def heartbeat(self, reg: Registration, usage: NodeUsage, ttl_ms: int) -> bool:
        """Refresh the record's TTL and usage; False if the record is gone (register again)."""
        args = [reg.token, ttl_ms, *_flat(usage.fields())]
        return bool(self._heartbeat(keys=[self._layout.node(reg.slot)], args=args))

    def deregister(self, reg: Registration) -> None:
        self._deregister(keys=[self._layout.node(reg.slot)], args=[reg.token])

    def live_nodes(self) -> list[NodeRecord]:
        """Every node whose current registration is alive, by node id."""
        slots = self._redis.hgetall(self._layout.ids)
        pipe = self._redis.pipeline(transaction=False)
        for slot in slots.values():
            pipe.hgetall(self._layout.node(slot))
        records = [NodeRecord.decode(raw) for raw in pipe.execute() if raw]
        return sorted(records, key=lambda r: r.node_id)


def _flat(fields: Mapping[bytes, object]) -> list[object]:
    return [x for pair in fields.items() for x in pair]
