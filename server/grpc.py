"""The gRPC path's node half: a Put stream of header frames then data frames copied once
into reserved slots, a Get stream answered from pinned slots, a Lookup. The path that
always works, wherever the client is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import grpc
import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.ingest import BlockIngest
from kvstore.keys import block_keys, check_keys
from kvstore.limits import MAX_BLOCKS, MAX_HEADER_FRAME, MAX_SALT, MAX_TOKENS
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import data_frames, decode_frame, parse
from kvstore.server.auth import Auth
from kvstore.server.fetch import Fetcher
from kvstore.server.status import TransferCounts
from kvstore.store import Store
from kvstore.tenants import Tenant, as_asked

HEADERS_TAG = b"\x0a"  # field 1 (headers), length-delimited: a frame of block headers


class GrpcPath:
    def __init__(
        self,
        store: Store,
        chunk_size: int,
        transfers: TransferCounts,
        fetcher: Fetcher,
        auth: Auth,
    ) -> None:
        self.store = store
        self.auth = auth
        self.fetcher = fetcher
        self.chunk_size = chunk_size
        self.transfers = transfers

    def put(self, frames: Iterator[bytes], context: grpc.ServicerContext, tenant: Tenant) -> bytes:
        tenant.may_write()
        with self.transfers.running(), ExitStack() as held:
            return self._put(frames, held, context.peer(), tenant)

    def _put(self, frames: Iterator[bytes], held: ExitStack, peer: str, tenant: Tenant) -> bytes:
        ingest: BlockIngest | None = None
        declared: list[tuple[bytes, int]] = []
        try:
            for raw in frames:
                if raw[:1] == HEADERS_TAG and len(raw) > MAX_HEADER_FRAME:
                    raise InvalidArgument(
                        "headers", f"a frame of {len(raw)} bytes: at most {MAX_HEADER_FRAME}"
                    )
                frame = decode_frame(raw, pb.PutRequest)
                if not isinstance(frame, memoryview) and frame.HasField("headers"):
                    if ingest is None:  # the first headers frame says how the put goes
                        ingest = BlockIngest(self.store, durable=frame.headers.durable)
                    blocks = tenant.blocks(headers_from_proto(frame.headers.blocks))
                    declared += [(key, meta.size) for key, meta in blocks]
                    self.auth.check(tenant, sum(size for _, size in declared))
                    ingest.declare(blocks)
                    nbytes = sum(meta.size for _, meta in blocks)
                    held.enter_context(self.transfers.holding(nbytes, peer))
                    continue
                if ingest is None:
                    ingest = BlockIngest(self.store)
                if isinstance(frame, memoryview):
                    ingest.feed(frame)
                elif frame.HasField("data"):
                    ingest.feed(memoryview(frame.data))
                else:
                    raise InvalidArgument("frame", "PutRequest sets neither headers nor data")
            ingest = ingest or BlockIngest(self.store)
            result = ingest.finish()
        except BaseException:
            if ingest is not None:
                ingest.abort()
            raise
        self.auth.charge(tenant, declared)
        self.transfers.add("put/grpc", ingest.received)
        return pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()

    def get(self, raw: bytes, context: grpc.ServicerContext, tenant: Tenant) -> Iterator[bytes]:
        request = parse(raw, pb.GetRequest)
        asked = check_keys(request.keys, unique=True)
        keys = tenant.keys(asked)
        self.fetcher.ensure(keys, request.wait_ms, request.fetch, context.is_active)
        with (
            self.transfers.running(),
            self.store.read(keys) as batch,
            self.transfers.holding(sum(b.meta.size for b in batch.blocks), context.peer()),
        ):
            self.auth.read(tenant, len(keys), [(b.key, b.meta.size) for b in batch.blocks])
            headers = headers_to_proto(as_asked(asked, ((b.key, b.meta) for b in batch.blocks)))
            reply = pb.GetReply(headers=pb.BlockHeaders(blocks=headers, truncated=batch.truncated))
            if batch.truncated and not batch.blocks:
                self.transfers.refused_busy()  # no room to bring a stored block up: busy
            yield reply.SerializeToString()
            # pinned to the end, released together (last first: see ReadBatch.close)
            for frame, _ in data_frames([b.view for b in batch.blocks], self.chunk_size):
                yield frame
        self.transfers.add("get/grpc", sum(b.meta.size for b in batch.blocks))

    def lookup(self, raw: bytes, context: grpc.ServicerContext, tenant: Tenant) -> bytes:
        request = parse(raw, pb.LookupRequest)
        keys = tenant.keys(self.lookup_keys(raw))
        if request.HasField("keys"):
            self.fetcher.ensure(keys, request.keys.wait_ms, request.keys.fetch, context.is_active)
        tiers = self.store.lookup(keys)
        return pb.LookupReply(found=len(tiers), tiers=tiers).SerializeToString()

    @staticmethod
    def lookup_keys(raw: bytes) -> list[bytes]:
        """The keys a LookupRequest names, or that its tokens hash to."""
        request = parse(raw, pb.LookupRequest)
        if request.HasField("tokens"):
            return token_keys(request.tokens)
        if request.HasField("keys"):
            return check_keys(request.keys.keys, "keys.keys")
        raise InvalidArgument("query", "LookupRequest sets neither keys nor tokens")


def token_keys(tokens: pb.TokenPrefix) -> list[bytes]:
    """The keys of a prompt the node hashes itself, within the limits of one request."""
    if tokens.block_size < 1:
        raise InvalidArgument("tokens.block_size", "must be >= 1")
    if len(tokens.token_ids) > MAX_TOKENS:
        raise InvalidArgument(
            "tokens.token_ids", f"{len(tokens.token_ids)} tokens: at most {MAX_TOKENS}"
        )
    if len(tokens.salt) > MAX_SALT:
        raise InvalidArgument("tokens.salt", f"{len(tokens.salt)} bytes: at most {MAX_SALT}")
    if len(tokens.token_ids) // tokens.block_size > MAX_BLOCKS:
        raise InvalidArgument(
            "tokens.block_size",
            f"{tokens.block_size} makes more than {MAX_BLOCKS} blocks of the tokens",
        )
    return block_keys(np.asarray(tokens.token_ids, dtype=np.uint32), tokens.block_size, tokens.salt)
