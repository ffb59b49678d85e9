"""The gRPC servicer: the control plane (Hello, Stats, Delete, Push) and the gRPC data
path, translating frames to core calls and back, nothing more.

Every handler receives the raw request bytes and parses them strictly, so a malformed
frame or an unknown field is INVALID_ARGUMENT naming it, not a generic deserialization
failure. Handlers that may hold an RPC thread for long (Put and Get streams, a push to
another node, a lookup that waits or fetches, Watch) pass one gate, `workers -
FREE_THREADS` wide, so health checks, Stats and plain lookups always find a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from kvstore.config import MIN_RATE
from kvstore.errors import Busy, InvalidArgument, PermissionDenied
from kvstore.keys import check_keys
from kvstore.limits import MAX_BLOCKS
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import parse
from kvstore.server.cluster import Membership
from kvstore.server.fetch import Fetcher
from kvstore.server.grpc import GrpcPath
from kvstore.server.policy import RequestPolicy
from kvstore.server.push import PushPolicy, push
from kvstore.server.status import streaming, unary
from kvstore.server.tickets import TicketBook
from kvstore.tenants import Tenant
from kvstore.trust import CHALLENGE, DIALED

SERVICE = "kvstore.v1.KVStore"
FREE_THREADS = 4  # RPC threads never taken by calls that may block: health, Stats, Lookup
PUSH_TIMEOUT = 60.0  # seconds a push may take when its caller set no deadline
MAX_WATCHERS = 8  # Watch streams at once (each holds an RPC thread for its life, in the gate)


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address as a data connection from it would show it."""
    peer = context.peer()  # ipv4:127.0.0.1:5000, ipv6:[::1]:5000, unix:...
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else kind
    host = host.removeprefix("::ffff:")
    return "127.0.0.1" if host == "::1" else host


class Gate:
    """At most `limit` handlers that may wait run at once; the next is refused at once (as
    busy, and `refused` counts it)."""

    def __init__(self, limit: int, what: str, refused: Callable[[], None]) -> None:
        self.limit = limit
        self.what = what
        self.refused = refused
        self._free = threading.BoundedSemaphore(limit)

    @contextmanager
    def enter(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            self.refused()
            raise Busy(
                f"{self.limit} {self.what} already run on this node's RPC threads: retry shortly"
            )
        try:
            yield
        finally:
            self._free.release()


class KVStoreServicer:
    def __init__(
        self,
        policy: RequestPolicy,
        chunk_size: int,
        tickets: TicketBook,
        *,
        membership: Membership,
        fetcher: Fetcher,
        instance: str,
        workers: int,
        push_allow: str,
        info: Callable[[], tuple[str, str]] = lambda: ("", ""),
        nixl: bool = False,
        dialable: frozenset[str] = frozenset(),
        min_rate: float = MIN_RATE,
    ) -> None:
        self.policy = policy
        self.auth = policy.auth
        self.store = policy.store
        self.transfers = policy.transfers
        self.chunk_size = chunk_size
        self.tickets = tickets
        self.membership = membership
        self.fetcher = fetcher
        self.instance = instance
        self.info = info  # (data address, unix address), known once the channel listens
        self.nixl = nixl  # the request channel moves payloads through NIXL too
        self.dialable = dialable  # HOST:PORT others may dial this node's gRPC at
        self.watchers = Gate(MAX_WATCHERS, "watchers", self.transfers.refused_busy)
        self.grpc = GrpcPath(policy, chunk_size, fetcher.timeout, min_rate)
        # everything that may block shares this one bound, so FREE_THREADS stay free
        self.gate = Gate(
            max(workers - FREE_THREADS, 1),
            "transfers, waits and watches",
            self.transfers.refused_busy,
        )
        self.push_policy = PushPolicy(push_allow)

    @unary
    def Put(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        tenant = self._tenant(context)
        with self.gate.enter():
            return self.grpc.put(frames, context, tenant)

    @streaming
    def Get(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        tenant = self._tenant(context)
        with self.gate.enter():
            yield from self.grpc.get(raw, context, tenant)

    @unary
    def Lookup(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self.grpc.lookup(raw, context, self._tenant(context), self.gate.enter)

    @unary
    def Delete(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        tenant = self._tenant(context)
        keys = tenant.keys(check_keys(parse(raw, pb.DeleteRequest).keys))
        tenant.may_write()
        return pb.DeleteReply(deleted=self.store.delete(keys)).SerializeToString()

    @unary
    def Stats(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        tenant = self._tenant(context)
        parse(raw, pb.StatsRequest)
        stats = self.store.stats()
        blocks, nbytes = self.auth.usage(tenant)
        if not tenant.admin:  # its own usage, and the tiers' sizes: nothing of the others'
            return pb.StatsReply(
                tiers=[pb.TierStats(name=t.name, capacity=t.capacity) for t in stats.tiers],
                uptime_s=stats.uptime_s,
                tenant=tenant.name,
                tenant_blocks=blocks,
                tenant_bytes=nbytes,
                quota=tenant.quota,
            ).SerializeToString()
        tiers = [pb.TierStats(**{f: getattr(t, f) for f in t.__slots__}) for t in stats.tiers]
        fetched_blocks, fetched_bytes = self.fetcher.stats()
        return pb.StatsReply(
            tenant=tenant.name,
            fetched_blocks=fetched_blocks,
            fetched_bytes=fetched_bytes,
            tiers=tiers,
            puts=stats.puts,
            gets=stats.gets,
            lookups=stats.lookups,
            uptime_s=stats.uptime_s,
            transfers=self.transfers.snapshot(),
        ).SerializeToString()

    @unary
    def Hello(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        challenge = dict(context.invocation_metadata()).get(CHALLENGE)
        if challenge is not None:
            return self._prove(str(challenge), context)
        parse(raw, pb.HelloRequest)
        tenant = self._tenant(context)
        data_address, unix_address = self.info()
        if not tenant.shm:
            unix_address = ""  # its memory map would show every tenant's bytes
        return pb.NodeInfo(
            node_id=self.membership.node_id,
            instance=self.instance,
            data_address=data_address,
            unix_address=unix_address,
            ticket=self.tickets.issue(peer_host(context), tenant)
            if data_address or unix_address
            else b"",
            ticket_ttl_s=self.tickets.ttl,
            capacity=self.store.capacity,
            host_capacity=self.store.host.capacity,
            max_block_size=self.store.max_block_size,
            max_blocks=MAX_BLOCKS,
            nixl=self.nixl and bool(data_address),
        ).SerializeToString()

    def _prove(self, challenge: str, context: grpc.ServicerContext) -> bytes:
        """Who this node is, proven with the cluster's secret to a caller that dialed one of
        its own addresses (no credential needed: a proof is of use to that caller only).
        The request itself is never read (server/preauth.py)."""
        cluster = self.auth.cluster
        if cluster is None:
            raise PermissionDenied("this node has no --cluster-secret: it proves nothing")
        try:
            nonce = bytes.fromhex(challenge)
        except ValueError:
            nonce = b""
        if not 16 <= len(nonce) <= 64:
            raise InvalidArgument(CHALLENGE, "16 to 64 random bytes, in hex")
        dialed = str(dict(context.invocation_metadata()).get(DIALED, ""))
        if dialed not in self.dialable:
            raise PermissionDenied(
                f"{DIALED}: this node is not reached at {dialed[:100]!r} (see --advertise)"
            )
        node_id = self.membership.node_id
        proof = cluster.prove(nonce, dialed, node_id, self.instance)
        return pb.NodeInfo(node_id=node_id, instance=self.instance, proof=proof).SerializeToString()

    @unary
    def Push(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        tenant = self._tenant(context)
        request = parse(raw, pb.PushRequest)
        keys = tenant.keys(check_keys(request.keys, unique=True))
        tenant.may_push()
        if not request.target:
            raise InvalidArgument("target", "must name the receiving node (HOST:PORT)")
        transport = request.transport or "auto"
        if transport not in ("auto", "nixl", "tcp", "grpc"):
            raise InvalidArgument(
                "transport", f"unknown transport {transport!r} (auto, nixl, tcp or grpc)"
            )
        self._may_push_to(request.target)
        with self.gate.enter(), self.transfers.running(), self.store.read(keys) as batch:
            if not batch.blocks:
                return pb.PushReply().SerializeToString()
            result = push(
                self._may_push_to,
                self.instance,
                request.target,
                transport,
                [(b.key, b.meta) for b in batch.blocks],
                [b.view for b in batch.blocks],
                min(context.time_remaining() or PUSH_TIMEOUT, PUSH_TIMEOUT),
                self.chunk_size,
                self.fetcher,
            )
        return pb.PushReply(
            found=len(batch.blocks), stored=result.stored, existed=result.existed
        ).SerializeToString()

    def _may_push_to(self, address: str, field: str = "target") -> None:
        """The cluster's nodes (signed records), or what --push-allow names; either way the
        target must then prove the cluster's secret before it is sent anything."""
        if self.auth.cluster is None:
            raise PermissionDenied(
                "this node has no --cluster-secret: it pushes only to nodes proven to share it"
            )
        if not self.membership.registered(address, data=field != "target"):
            self.push_policy.check(address, field)

    @unary
    def Prefetch(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        tenant = self._tenant(context)
        keys = tenant.keys(check_keys(parse(raw, pb.GetRequest).keys))
        present, started = self.fetcher.prefetch(keys)  # never blocks: no gate (its own pool)
        return pb.PrefetchReply(present=present, started=started).SerializeToString()

    @unary
    def Locate(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        keys = self._tenant(context).keys(self.grpc.lookup_keys(raw))
        found, local_only = self.membership.locate(keys)
        nodes = [
            pb.NodeLocation(
                node_id=loc.node_id,
                address=loc.address,
                data_address=loc.data_address,
                matched=loc.matched,
                tiers=dict(loc.tiers),
                load=pb.NodeLoad(inflight=loc.load.inflight, bytes_per_s=loc.load.bytes_per_s),
                score=loc.score,
            )
            for loc in found
        ]
        return pb.LocateReply(nodes=nodes, local_only=local_only).SerializeToString()

    @streaming
    def Watch(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._tenant(context).may_see_all("Watch")
        request = parse(raw, pb.WatchRequest)
        start = request.from_sequence if request.HasField("from_sequence") else None
        with self.watchers.enter(), self.gate.enter():
            watch = self.membership.events.watch(start)
            context.add_callback(watch.cancel)  # the caller went away: stop waiting
            node = self.membership.node_id
            for batch in watch:
                yield pb.EventBatch(
                    sequence=batch.sequence, payload=batch.payload, node_id=node,
                    instance=self.instance,
                ).SerializeToString()  # fmt: skip

    def _tenant(self, context: grpc.ServicerContext) -> Tenant:
        return self.policy.tenant(context.invocation_metadata())

    def handler(self) -> grpc.GenericRpcHandler:
        """Every method takes and returns raw bytes: framing is done above."""
        raw = {"request_deserializer": None, "response_serializer": None}
        unary_methods = ("Lookup", "Delete", "Stats", "Hello", "Push", "Locate", "Prefetch")
        methods = {
            name: grpc.unary_unary_rpc_method_handler(getattr(self, name), **raw)
            for name in unary_methods
        }
        methods["Put"] = grpc.stream_unary_rpc_method_handler(self.Put, **raw)
        methods["Get"] = grpc.unary_stream_rpc_method_handler(self.Get, **raw)
        methods["Watch"] = grpc.unary_stream_rpc_method_handler(self.Watch, **raw)
        return grpc.method_handlers_generic_handler(SERVICE, methods)
