"""The cluster a trace replays through: N daemons started with --cluster on a Redis.

Each node's host tier is sized from the daemon's own slot cost
(`HostTier.slot_cost`) so that it holds exactly its share of the capacity in
blocks, and `check_host` proves it before the replay: that many blocks fit, and
one more put evicts exactly one. A disk tier, when asked for, gets its share
of the disk blocks in segments of at most 1/32 of it (the daemon's smallest
segment, 1 MiB, where that is more).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvstore.arena import aligned
from kvstore.bench.procs import Processes, RedisServer, cluster_secret, listening
from kvstore.bench.trace_refs import node_capacities
from kvstore.client import Client
from kvstore.errors import KVStoreError
from kvstore.keys import block_keys
from kvstore.limits import BLOCK_OVERHEAD
from kvstore.tiers.host import HostTier
from kvstore.tiers.segments import PAGE, layout

MIN_SEGMENT = 1 << 20  # the daemon refuses smaller segments
MIN_HOST = 1 << 20  # and smaller host tiers
META_BYTES = 256  # an upper bound on a block's encoded metadata in a disk record
HEARTBEAT_S, NODE_TTL_S = 1.0, 10.0  # a loaded machine may delay beats by seconds


def host_bytes(blocks: int, block_bytes: int) -> int:
    """Host capacity that holds exactly `blocks` blocks of `block_bytes`."""
    return blocks * HostTier.slot_cost(block_bytes)


def disk_layout(blocks: int, block_bytes: int) -> tuple[int, int]:
    """(capacity, segment size) in bytes of a disk tier of `blocks` blocks: whole
    segments of at least 32 to the tier, each a header page and its records."""
    record = layout(META_BYTES, block_bytes)[1]
    per_segment = max(blocks // 32, -(-(MIN_SEGMENT - PAGE) // record), 1)
    segments = -(-blocks // per_segment)
    return blocks * record + segments * PAGE, PAGE + per_segment * record


@dataclass
class Node:
    node_id: str
    address: str
    host_blocks: int
    disk_blocks: int = 0
    process: subprocess.Popen | None = None
    client: Client | None = None
    alive: bool = True
    flags: tuple[str, ...] = ()  # what it was started with, to start it again
    timeout_s: float | None = None  # the deadline of each call its client makes

    def connect(self) -> Client:
        if self.client is None:
            self.client = Client(self.address, timeout=self.timeout_s)
        return self.client

    def replaced(self, process: subprocess.Popen, address: str) -> None:
        """Started again (empty, at `address`): calls go to the new process from now on."""
        if self.client is not None:
            self.client.close()
        self.process, self.address, self.client, self.alive = process, address, None, True


@dataclass
class TraceCluster:
    redis_url: str
    nodes: list[Node]
    started: bool  # by the bench (so it may size, check and kill its nodes)
    redis_baseline: int = 0  # Redis's used_memory before any node published
    disk_dirs: list[Path] = field(default_factory=list)
    redis: RedisServer | None = None  # the Redis the bench started (a chaos run's faults)
    restarted: list[tuple[Node, subprocess.Popen, str]] = field(default_factory=list)

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def kill(self, node_id: str) -> None:
        """SIGKILL: no deregistration, no last words; its record expires with the TTL."""
        node = self.node(node_id)
        if node.process is not None:
            node.process.kill()
            node.process.wait()
        node.alive = False

    def restart(self, procs: Processes, node_id: str) -> None:
        """Start a killed node again, empty, under the same id; return once it is
        registered under a new incarnation (RuntimeError after 30 s). Safe from a thread
        of its own: the node's process and client are swapped only by `Node.replaced`,
        which the caller runs (`restarted` hands over what to run)."""
        node = self.node(node_id)
        proc = procs.start_daemon(*node.flags)
        address = listening(proc)
        _registered(self.redis_url, {node_id}, address=address)
        self.restarted.append((node, proc, address))

    def close(self) -> None:
        for node in self.nodes:
            if node.client is not None:
                node.client.close()


def start(
    procs: Processes,
    nodes: int,
    capacity_blocks: int,
    block_bytes: int,
    *,
    disk_blocks: int = 0,
    flags: tuple[str, ...] = (),
    redis_url: str | None = None,
    timeout_s: float | None = None,
) -> TraceCluster:
    """A Redis (unless `redis_url`) and `nodes` daemons registered in it, started at once;
    `timeout_s`: the deadline of each call the bench makes to a node."""
    server = None if redis_url else procs.redis_server()
    url = redis_url or (server.url if server else None)
    if url is None:
        raise RuntimeError("kvstore-bench trace needs redis-server on PATH (or --redis)")
    baseline = _used_memory(url)
    hosts = node_capacities(capacity_blocks, nodes)
    disks = node_capacities(disk_blocks, nodes) if disk_blocks else [0] * nodes
    members, dirs, waiting = [], [], []
    for i, (host, disk) in enumerate(zip(hosts, disks, strict=True)):
        node_flags = ["--host-capacity", str(host_bytes(host, block_bytes))]
        if disk:
            dirs.append(procs.tempdir())
            capacity, segment = disk_layout(disk, block_bytes)
            node_flags += [
                "--disk-dir",
                str(dirs[-1]),
                "--disk-capacity",
                str(capacity),
                "--segment-size",
                str(segment),
            ]
        node_id = f"trace-{i}"
        cluster_flags = [
            "--cluster",
            url,
            "--node-id",
            node_id,
            "--heartbeat",
            str(HEARTBEAT_S),
            "--node-ttl",
            str(NODE_TTL_S),
        ]
        all_flags = (*node_flags, *cluster_flags, *flags)
        waiting.append(procs.start_daemon(*all_flags))
        members.append(Node(node_id, "", host, disk, waiting[-1], None, True, all_flags, timeout_s))
    for member, proc in zip(members, waiting, strict=True):
        member.address = listening(proc)
    _registered(url, {m.node_id for m in members})
    return TraceCluster(url, members, True, baseline, dirs, server)


def _registered(
    url: str, node_ids: set[str], timeout_s: float = 30.0, address: str | None = None
) -> None:
    """Wait until every node is in the registry (at `address`, if given): a node registers
    from a thread of its own, after it prints its address, and a router routes only to
    registered nodes. Redis may be away for a while meanwhile (a chaos run)."""
    from kvstore.errors import Unavailable
    from kvstore.router import Router

    deadline = time.monotonic() + timeout_s
    with Router(url, secret=cluster_secret()) as router:
        while True:
            try:
                records = router.nodes()
            except Unavailable:
                records = []
            seen = {r.node_id for r in records if address is None or r.address == address}
            if node_ids <= seen:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {sorted(node_ids)} did not register within {timeout_s}s")
            time.sleep(0.02)


def attach(redis_url: str, block_bytes: int) -> TraceCluster:
    """The live nodes of a cluster that is already up, as its registry lists them."""
    from kvstore.router import Router

    with Router(redis_url, secret=cluster_secret()) as router:
        records = router.nodes()
    if not records:
        raise RuntimeError(f"no live kvstore node is registered in {redis_url}")
    members = []
    for record in records:
        host = next((t.capacity for t in record.usage.tiers if t.name == "host"), 0)
        disk = next((t.capacity for t in record.usage.tiers if t.name == "disk"), 0)
        record_bytes = layout(META_BYTES, block_bytes)[1]
        members.append(
            Node(
                record.node_id,
                record.address,
                host // HostTier.slot_cost(block_bytes),
                disk // record_bytes,
            )
        )
    return TraceCluster(redis_url, members, False, _used_memory(redis_url))


def put_part(block_bytes: int, blocks: int) -> int:
    """Most blocks one put may carry for a host tier of `blocks` to stay exact. The daemon
    counts the index cost (BLOCK_OVERHEAD) of committed blocks only: a batch of k blocks
    reserved into a full tier is k - 1 of those short, and with the arena's rounding up
    to a page, a whole slot too many fits once that reaches a slot."""
    slot = HostTier.slot_cost(block_bytes)
    slack = aligned(host_bytes(blocks, block_bytes)) - host_bytes(blocks, block_bytes)
    return max(1, min(blocks, (slot - slack - 1) // BLOCK_OVERHEAD + 1))


def check_host(client: Client, blocks: int, block_bytes: int, salt: bytes, name: str) -> None:
    """The node's host tier holds exactly `blocks` blocks: that many fit, one more put
    evicts exactly one, and so does a put of `put_part` more. Raises RuntimeError
    otherwise; deletes what it put."""
    part = put_part(block_bytes, blocks)
    keys = block_keys(np.arange(blocks + 1 + part), 1, salt + name.encode())
    payload = np.zeros(block_bytes, np.uint8)
    for start in range(0, blocks, part):
        chunk = keys[start : min(blocks, start + part)]
        client.put(chunk, [payload] * len(chunk))
    seen = [_host(client)]
    client.put([keys[blocks]], [payload])
    seen.append(_host(client))
    client.put(keys[blocks + 1 :], [payload] * part)
    seen.append(_host(client))
    for start in range(0, len(keys), 4096):
        client.delete(keys[start : start + 4096])
    held = [s.blocks for s in seen]
    evicted = [seen[1].evictions - seen[0].evictions, seen[2].evictions - seen[1].evictions]
    if held != [blocks] * 3 or evicted != [1, part]:
        raise RuntimeError(
            f"{name}: sized for {blocks} blocks of {block_bytes} bytes, its host tier held "
            f"{held[0]}, then {held[1]} after one more put ({evicted[0]} evicted), then "
            f"{held[2]} after {part} more ({evicted[1]} evicted)"
        )


def written_bytes(node: Node) -> int | None:
    """Bytes the node's process sent to storage (/proc/PID/io): its disk tier's appends,
    second-chance copies and compactions; None where the kernel does not say."""
    if node.process is None or not node.alive:
        return None
    try:
        text = Path(f"/proc/{node.process.pid}/io").read_text()
    except OSError:
        return None
    fields = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    return int(fields["write_bytes"]) if "write_bytes" in fields else None


def _host(client: Client):
    return next(t for t in client.stats().tiers if t.name == "host")


def _used_memory(url: str) -> int:
    import redis

    with redis.Redis.from_url(url) as r:
        return int(r.info("memory")["used_memory"])


def index_stats(cluster: TraceCluster) -> tuple[int, float]:
    """(bytes of Redis the index grew by, (block, live node) entries per indexed block)."""
    import redis

    from kvstore.cluster.layout import Layout, words

    lay = Layout()
    with redis.Redis.from_url(cluster.redis_url) as r:
        used = int(r.info("memory")["used_memory"]) - cluster.redis_baseline
        live = {int(slot) for slot in r.hgetall(lay.ids).values() if r.exists(lay.node(int(slot)))}
        entries = blocks = 0
        names = list(r.scan_iter(match=lay.prefix + b"b*", count=1000))
        for start in range(0, len(names), 1000):
            for value in r.mget(names[start : start + 1000]):
                held = [s for s in words(value) if s in live]
                entries += len(held)
                blocks += bool(held)
    return used, entries / blocks if blocks else 0.0


def node_stats(node: Node) -> dict[str, int]:
    """What a node's tiers hold at the end, and how much its host tier wrote down."""
    if not node.alive:
        return {}
    try:
        stats = node.connect().stats()
    except KVStoreError:
        return {}
    out: dict[str, int] = {}
    for tier in stats.tiers:
        out[f"{tier.name}_blocks"] = tier.blocks
        out[f"{tier.name}_evictions"] = tier.evictions
        if tier.name == "host":
            out["demoted_blocks"] = tier.demotions
        if tier.name == "disk":
            out["disk_file_bytes"] = tier.bytes
    return out
