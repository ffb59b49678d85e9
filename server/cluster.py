"""What a node tells the rest of the cluster: what it holds, and what changes.

Every change of every tier becomes KV events (vLLM's stream over ZMQ, and gRPC Watch)
and, with `--cluster`, an entry of the location index in Redis (its fastest tier per
block). Both are fed after the tiers' changes, off their locks, and never wait: a put
never waits on Redis or on a subscriber. The node registers and heartbeats with its
tiers' use and its load; with Redis away it serves on, local-only, and re-publishes
everything it holds when Redis returns.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from kvstore.cluster import ClusterIndex, Load, Location, NodeUsage, TierUsage
from kvstore.cluster.connection import parse_redis_url
from kvstore.cluster.registry import NodeRecord
from kvstore.errors import InvalidArgument, KVStoreError, Unavailable
from kvstore.events import EventLog, ZmqPublisher
from kvstore.keys import BlockKey
from kvstore.server.status import TransferCounts
from kvstore.store import Store
from kvstore.trust import ClusterSecret

log = logging.getLogger("kvstore.cluster")
NODE_ID_FILE = "NODE_ID"


class Membership:
    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        address: str,
        data_address: str,
        cluster: str,
        heartbeat: float,
        node_ttl: float,
        events_address: str,
        events_replay: str,
        events_topic: str,
        transfers: TransferCounts,
        cluster_secret: ClusterSecret | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.address = address
        self.transfers = transfers
        self.events = EventLog()
        self.events.cleared()  # sequences restart with the process: say so first
        self.publisher = None
        if events_address:
            self.publisher = ZmqPublisher(
                self.events, events_address, events_replay or None, topic=events_topic
            )
        self.index = None
        if cluster:
            if cluster_secret is None:
                raise ValueError("cluster: the cluster's secret is required (--cluster-secret)")
            self.index = ClusterIndex(
                cluster,
                node_id,
                address,
                store.listing,
                secret=cluster_secret,
                data_address=data_address,
                usage=self.usage,
                heartbeat_s=heartbeat,
                ttl_s=node_ttl,
            )
        disk = store.disk
        if disk is not None:  # what the disk kept over the restart
            keys = disk.listing()
            for start in range(0, len(keys), 1024):
                self.events.stored(keys[start : start + 1024], disk.name)
        store.watch(self.changed)

    def changed(self, tier: str, stored: list[BlockKey], removed: list[BlockKey]) -> None:
        self.events.stored(stored, tier)
        self.events.removed(removed, tier)
        if self.index is None:
            return
        keys = stored + removed
        now: dict[str, list[BlockKey]] = {}
        for key, fastest in zip(keys, self.store.fastest(keys), strict=True):
            now.setdefault(fastest or "", []).append(key)
        for fastest, group in now.items():
            if fastest:
                self.index.moved(group, fastest)
            else:
                self.index.removed(group)

    def usage(self) -> NodeUsage:
        tiers = tuple(
            TierUsage(t.name, t.capacity, t.bytes, t.blocks) for t in self.store.stats().tiers
        )
        return NodeUsage(tiers, Load(*self.transfers.load()))

    def locate(self, keys: Sequence[BlockKey]) -> tuple[list[Location], str]:
        """Nodes holding a prefix of `keys`, best first, and why the answer is this node's
        alone ("" if it is the cluster's)."""
        if self.index is not None:
            try:
                return self.index.locate(keys), ""
            except Unavailable as exc:
                reason = f"the cluster index is unreachable ({exc}): this node's holdings only"
        else:
            reason = "this node runs without --cluster: its holdings only"
        tiers = self.store.lookup(keys)
        if not tiers:
            return [], reason
        counts: dict[str, int] = {}
        for name in tiers:
            counts[name] = counts.get(name, 0) + 1
        load = Load(self.transfers.inflight, 0.0)
        here = Location(self.node_id, self.address, "", len(tiers), counts, load)
        return [here], reason

    def registered(self, address: str, *, data: bool = False) -> bool | None:
        """Whether `address` is a live node's gRPC address (`data`: data-plane address);
        None when unknown (no cluster, or Redis away)."""
        if self.index is None:
            return None
        try:
            nodes: list[NodeRecord] = self.index.nodes()
        except KVStoreError:
            return None
        return any((node.data_address if data else node.address) == address for node in nodes)

    def leave(self) -> None:
        """Out of every cluster answer now (a draining node takes no new work)."""
        if self.index is not None:
            self.index.close()
            self.index = None

    def close(self) -> None:
        self.leave()
        self.events.close()
        if self.publisher is not None:
            self.publisher.close()


def node_id(configured: str, disk_dir: str) -> str:
    """The node's stable id: as configured, else the one kept in the disk directory (so a
    restart on the same disk is the same node), else a new one; kept there for next time."""
    path = Path(disk_dir) / NODE_ID_FILE if disk_dir else None
    chosen = configured
    if not chosen and path is not None and path.exists():
        chosen = path.read_text().strip()
    chosen = chosen or f"{socket.gethostname()}-{os.urandom(4).hex()}"
    if path is not None:
        path.write_text(chosen + "\n")
    return chosen


def check_cluster_url(url: str) -> None:
    """A malformed --cluster is a start-up error; one that does not answer is not."""
    if url:
        try:
            parse_redis_url(url)
        except (InvalidArgument, ValueError) as exc:
            raise ValueError(f"cluster: {exc}") from None
