"""The gRPC servicer: translates frames to core calls and back, nothing more.

Every handler receives the raw request bytes and parses them strictly, so a
malformed frame or an unknown field is INVALID_ARGUMENT naming it, not a
generic deserialization failure.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np

from kvstore.errors import InvalidArgument, KVStoreError, Unavailable, Unsupported
from kvstore.ingest import BlockIngest, SlotPut
from kvstore.keys import block_keys, check_keys
from kvstore.limits import MAX_BLOCKS, MAX_HEADER_FRAME, MAX_TOKENS
from kvstore.meta import BlockMeta
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import FrameError, M, data_frames, decode_frame, reject_unknown
from kvstore.server.status import TransferCounts, streaming, unary
from kvstore.server.tickets import Ticket, TicketBook
from kvstore.store import Store
from kvstore.tiers import PinnedBlock

SERVICE = "kvstore.v1.KVStore"
HEADERS_TAG = b"\x0a"  # field 1 (headers), length-delimited: a frame of block headers


def meta_from_proto(meta: pb.BlockMeta) -> BlockMeta:
    return BlockMeta(
        size=meta.size,
        dtype=meta.dtype,
        shape=tuple(meta.shape),
        layout=meta.layout,
        codec=meta.codec,
        raw_size=meta.raw_size,
        checksum=meta.checksum,
    )


def meta_to_proto(meta: BlockMeta) -> pb.BlockMeta:
    return pb.BlockMeta(
        size=meta.size,
        dtype=meta.dtype,
        shape=meta.shape,
        layout=meta.layout,
        codec=meta.codec,
        raw_size=meta.raw_size,
        checksum=meta.checksum,
    )


def parse(raw: bytes, message_type: type[M]) -> M:
    try:
        message = message_type.FromString(raw)
    except Exception as exc:  # DecodeError, or a RuntimeError from a malformed nested field
        raise FrameError(f"malformed {message_type.__name__}: {exc}") from None
    reject_unknown(message)
    return message


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address as a data connection from it would show it."""
    peer = context.peer()  # ipv4:127.0.0.1:5000, ipv6:[::1]:5000, unix:...
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else kind
    return same_host(host)


def same_host(host: str) -> str:
    """One spelling per host: IPv4-mapped and IPv6 loopback fold onto IPv4."""
    host = host.removeprefix("::ffff:")
    return "127.0.0.1" if host == "::1" else host


class KVStoreServicer:
    def __init__(
        self,
        store: Store,
        chunk_size: int,
        tickets: TicketBook,
        data_address: str = "",
    ) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.tickets = tickets
        self.data_address = data_address
        self.transfers = TransferCounts()
        self._peers: dict[tuple[str, str], object] = {}
        self._peers_lock = threading.Lock()

    @unary
    def Put(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        ingest = BlockIngest(self.store)
        try:
            for raw in frames:
                if raw[:1] == HEADERS_TAG and len(raw) > MAX_HEADER_FRAME:
                    raise InvalidArgument(
                        "headers", f"a frame of {len(raw)} bytes: at most {MAX_HEADER_FRAME}"
                    )
                frame = decode_frame(raw, pb.PutRequest)
                if isinstance(frame, memoryview):
                    ingest.feed(frame)
                elif frame.HasField("headers"):
                    ingest.declare([(h.key, meta_from_proto(h.meta)) for h in frame.headers.blocks])
                elif frame.HasField("data"):
                    ingest.feed(memoryview(frame.data))
                else:
                    raise InvalidArgument("frame", "PutRequest sets neither headers nor data")
            result = ingest.finish()
        except BaseException:
            ingest.abort()
            raise
        self.transfers.add("put/grpc")
        return pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()

    @streaming
    def Get(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        keys = check_keys(parse(raw, pb.GetRequest).keys, unique=True)
        with self.store.read(keys) as batch:
            headers = [pb.BlockHeader(key=b.key, meta=meta_to_proto(b.meta)) for b in batch.blocks]
            yield pb.GetReply(headers=pb.BlockHeaders(blocks=headers)).SerializeToString()
            pending: Iterator[PinnedBlock] = iter(batch.blocks)
            for frame, ended in data_frames([b.view for b in batch.blocks], self.chunk_size):
                for _ in range(ended):  # copied into `frame`: the tier may evict them again
                    batch.release(next(pending))
                yield frame
        self.transfers.add("get/grpc")

    @unary
    def Lookup(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = parse(raw, pb.LookupRequest)
        if request.HasField("tokens"):
            tokens = request.tokens
            if tokens.block_size < 1:
                raise InvalidArgument("tokens.block_size", "must be >= 1")
            if len(tokens.token_ids) > MAX_TOKENS:
                raise InvalidArgument(
                    "tokens.token_ids", f"{len(tokens.token_ids)} tokens: at most {MAX_TOKENS}"
                )
            if len(tokens.token_ids) // tokens.block_size > MAX_BLOCKS:
                raise InvalidArgument(
                    "tokens.block_size",
                    f"{tokens.block_size} makes more than {MAX_BLOCKS} blocks of the tokens",
                )
            keys = block_keys(
                np.asarray(tokens.token_ids, dtype=np.uint32), tokens.block_size, tokens.salt
            )
        elif request.HasField("keys"):
            keys = check_keys(request.keys.keys, "keys.keys")
        else:
            raise InvalidArgument("query", "LookupRequest sets neither keys nor tokens")
        tiers = self.store.lookup(keys)
        return pb.LookupReply(found=len(tiers), tiers=tiers).SerializeToString()

    @unary
    def Delete(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        keys = check_keys(parse(raw, pb.DeleteRequest).keys)
        return pb.DeleteReply(deleted=self.store.delete(keys)).SerializeToString()

    @unary
    def Stats(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        parse(raw, pb.StatsRequest)
        stats = self.store.stats()
        tiers = [pb.TierStats(**{f: getattr(t, f) for f in t.__slots__}) for t in stats.tiers]
        return pb.StatsReply(
            tiers=tiers,
            puts=stats.puts,
            gets=stats.gets,
            lookups=stats.lookups,
            uptime_s=stats.uptime_s,
            transfers=self.transfers.snapshot(),
        ).SerializeToString()

    @unary
    def OpenPut(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = parse(raw, pb.OpenPutRequest)
        if not request.blocks:
            raise InvalidArgument("blocks", "empty batch: declare at least one block")
        blocks = [(h.key, meta_from_proto(h.meta)) for h in request.blocks]
        host = peer_host(context)
        if request.shared_memory:
            slots = SlotPut(self.store, blocks)
            ticket = self.tickets.issue(host, put=slots)
            offsets = [self.store.host.segment_offset(s.offset) for *_, s in slots.slots]
            return self._ticket(ticket, present=slots.present, offsets=offsets)
        self._data_plane()
        ingest = BlockIngest(self.store, omit_present=True)
        present = ingest.declare(blocks)
        return self._ticket(self.tickets.issue(host, put=ingest), present=present)

    @unary
    def OpenGet(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = parse(raw, pb.OpenGetRequest)
        keys = check_keys(request.keys, unique=True)
        if not request.shared_memory:
            self._data_plane()
        batch = self.store.pin(keys)
        headers = [pb.BlockHeader(key=b.key, meta=meta_to_proto(b.meta)) for b in batch.blocks]
        if not headers:
            return pb.Ticket(data_address=self.data_address).SerializeToString()
        offsets = [self.store.host.segment_offset(b.offset) for b in batch.blocks]
        ticket = self.tickets.issue(peer_host(context), get=batch)
        return self._ticket(
            ticket, blocks=headers, offsets=offsets if request.shared_memory else ()
        )

    @unary
    def Finish(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        ticket = self.tickets.redeem(parse(raw, pb.FinishRequest).ticket, peer_host(context))
        try:
            result = ticket.put.commit() if isinstance(ticket.put, SlotPut) else None
        finally:
            ticket.cancel()
        self.transfers.add("get/shm" if result is None else "put/shm")
        if result is None:
            return pb.PutReply().SerializeToString()
        return pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()

    @unary
    def Segment(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        parse(raw, pb.StatsRequest)
        host = self.store.host
        if host.segment_path is None:
            raise Unsupported("this node's host arena is not in shared memory")
        return pb.SegmentInfo(
            path=host.segment_path, token=host.segment_token, size=host.capacity
        ).SerializeToString()

    def _ticket(self, ticket: Ticket, **fields: object) -> bytes:
        return pb.Ticket(
            id=ticket.id, data_address=self.data_address, expires_in_s=self.tickets.ttl, **fields
        ).SerializeToString()

    def _data_plane(self) -> None:
        if not self.data_address:
            raise Unsupported("this node runs no data plane (--data-address off)")

    @unary
    def Push(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = parse(raw, pb.PushRequest)
        keys = check_keys(request.keys)
        if not request.target:
            raise InvalidArgument("target", "must name the receiving node (HOST:PORT)")
        transport = request.transport or "auto"
        if transport not in ("auto", "shm", "tcp", "grpc"):
            raise InvalidArgument("transport", f"unknown transport {transport!r}")
        with self.store.read(keys) as batch:
            if not batch.blocks:
                return pb.PushReply().SerializeToString()
            headers = [pb.BlockHeader(key=b.key, meta=meta_to_proto(b.meta)) for b in batch.blocks]
            try:
                peer = self._peer(request.target, transport)
                result = peer.put_encoded(headers, [b.view for b in batch.blocks])
            except KVStoreError as exc:
                raise Unavailable(f"push to {request.target} failed: {exc}") from None
        return pb.PushReply(
            found=len(headers), stored=result.stored, existed=result.existed
        ).SerializeToString()

    def _peer(self, target: str, transport: str):
        from kvstore.client import Client  # a node pushing is a client of the other node

        with self._peers_lock:
            if (target, transport) not in self._peers:
                self._peers[target, transport] = Client(
                    target, chunk_size=self.chunk_size, transport=transport
                )
            return self._peers[target, transport]

    def handler(self) -> grpc.GenericRpcHandler:
        """Every method takes and returns raw bytes: framing is done above."""
        raw = {"request_deserializer": None, "response_serializer": None}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Put": grpc.stream_unary_rpc_method_handler(self.Put, **raw),
                "Get": grpc.unary_stream_rpc_method_handler(self.Get, **raw),
                "Lookup": grpc.unary_unary_rpc_method_handler(self.Lookup, **raw),
                "Delete": grpc.unary_unary_rpc_method_handler(self.Delete, **raw),
                "Stats": grpc.unary_unary_rpc_method_handler(self.Stats, **raw),
                "OpenPut": grpc.unary_unary_rpc_method_handler(self.OpenPut, **raw),
                "OpenGet": grpc.unary_unary_rpc_method_handler(self.OpenGet, **raw),
                "Push": grpc.unary_unary_rpc_method_handler(self.Push, **raw),
                "Finish": grpc.unary_unary_rpc_method_handler(self.Finish, **raw),
                "Segment": grpc.unary_unary_rpc_method_handler(self.Segment, **raw),
            },
        )
