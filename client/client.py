"""The synchronous client that serving engines embed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
import numpy as np

from kvstore import codecs
from kvstore.client import shm
from kvstore.client._wire import (
    CHANNEL_OPTIONS,
    Decoder,
    GetAssembler,
    Payload,
    batches,
    bind,
    check_batch,
    encoded_parts,
    error_from_rpc,
    get_request,
    payload_size,
    put_frames,
    stats_from_proto,
)
from kvstore.client.base import ClientBase
from kvstore.client.dataplane import Arrived, Unreachable, receive_get, send_put
from kvstore.errors import Unsupported
from kvstore.ingest import PutResult
from kvstore.keys import BlockKey, check_keys, check_tokens
from kvstore.limits import MAX_TOKENS
from kvstore.proto import kvstore_pb2 as pb
from kvstore.store import StoreStats

IN_PLACE_PART = 256 << 20  # bytes per part of an in-place put
IN_PLACE_AHEAD = 2  # parts whose copies may still run while the next part opens


class Client(ClientBase):
    """Batch calls to one node; thread-safe, so one client can serve many threads.

    Prefix semantics: `lookup` counts the leading keys present, `get` returns the
    leading blocks present (fewer than asked at the first missing key, never an
    error). Errors raise `kvstore.KVStoreError` subclasses.

    `transport`: `auto` takes the fastest path the node and this host allow:
    shared memory when client and node share the host (proven, never assumed),
    else the node's raw TCP data plane, else the gRPC stream. `shm`, `tcp` or
    `grpc` force one path.

    `codec` and `layout` are the defaults for puts (one client per namespace, or
    pass them per `put`); gets decode whatever codec each block names. Encoding
    and decoding run in a thread pool over all cores.
    """

    def _open(self) -> None:
        self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._put, self._get, self._unary = bind(self._channel)
        self._shm_ok = self.transport in ("auto", "shm")
        self._segment: shm.SharedSegment | None = None

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        *,
        codec: str | None = None,
        layout: str | None = None,
    ) -> PutResult:
        """Store one payload per key (bytes-like or numpy arrays, 1 B and up) in one transfer,
        encoded with `codec` (default: the client's) and recording `layout`."""
        encoding = self._encoding(codec, layout, payloads)
        if self._capacity is None:  # fixed for the node's life: asked once
            self._capacity = sum(tier.capacity for tier in self.stats().tiers)
        capacity = self._capacity
        check_batch(keys, payloads)
        self._check_fits(capacity, [payload_size(p) for p in payloads])  # raw: an upper bound
        parts = encoded_parts(keys, payloads, encoding, self._pool)
        return sum((self.put_encoded(*part) for part in parts), PutResult(0, 0))

    def put_encoded(
        self, headers: Sequence[pb.BlockHeader], views: Sequence[memoryview]
    ) -> PutResult:
        """Put blocks whose headers are already built (e.g. a node forwarding its own)."""
        if segment := self._shared_segment():
            result = PutResult(0, 0)
            sizes = [len(view) for view in views]
            for part in batches(sizes, len(segment.memory) // 4):  # slots are held at once
                request = pb.OpenPutRequest(blocks=headers[part], shared_memory=True)
                ticket = pb.Ticket.FromString(self._call("OpenPut", request))
                result += shm.put(segment, ticket, views[part], self._finish, self._pool)
            return result
        if self._tcp_ok:
            try:
                request = pb.OpenPutRequest(blocks=headers)
                ticket = pb.Ticket.FromString(self._call("OpenPut", request))
                return send_put(self._data, ticket, views)
            except (Unreachable, Unsupported) as exc:
                self._fall_back(exc)
        reply = pb.PutReply.FromString(
            self._call_with(self._put, put_frames(headers, views, self.chunk_size))
        )
        return PutResult(reply.stored, reply.existed)

    def put_in_place(
        self,
        keys: Sequence[BlockKey],
        dtype: np.dtype,
        shape: tuple[int, ...],
        fill: shm.Fill,
        *,
        layout: str | None = None,
    ) -> PutResult:
        """Store one block per key, each a `dtype` array of `shape`, that `fill(indexes,
        slots)` writes straight into the node's shared arena: `slots[j]` is the writable
        bytes of block `indexes[j]` (blocks already stored are left out). One copy fewer
        than `put`, for data not yet in host memory (a GPU's). Same host only; no codec,
        no checksum.

        Blocks go in parts of `IN_PLACE_PART` bytes. `fill` may start its copies and
        return a wait function instead of finishing them: the part is published after
        the wait, once the next part's slots are handed out, so copies overlap the
        node's bookkeeping. If `fill` raises, the node frees unpublished slots when
        their ticket expires."""
        segment = self._shared_segment()
        if segment is None:
            raise Unsupported("in-place puts need a node on this host with a shared arena")
        keys = check_keys(keys, unique=True)
        dtype = np.dtype(dtype)
        meta = pb.BlockMeta(
            size=int(np.prod(shape)) * dtype.itemsize,
            dtype=codecs.dtype_name(dtype),
            shape=shape,
            layout=self.encoding.layout if layout is None else layout,
        )
        sizes = [meta.size] * len(keys)
        pending: list[tuple[bytes, Callable[[], None] | None]] = []
        replies = []
        for part in batches(sizes, min(len(segment.memory) // 4, IN_PLACE_PART)):
            request = pb.OpenPutRequest(
                blocks=[pb.BlockHeader(key=k, meta=meta) for k in keys[part]], shared_memory=True
            )
            ticket = pb.Ticket.FromString(self._call("OpenPut", request))
            wanted, slots = shm.slots(segment, ticket, range(len(keys))[part], sizes)
            pending.append((ticket.id, fill(wanted, slots) if wanted else None))
            if len(pending) > IN_PLACE_AHEAD:
                replies.append(self._publish(*pending.pop(0)))
        replies += [self._publish(*p) for p in pending]
        return PutResult(sum(r.stored for r in replies), sum(r.existed for r in replies))

    def _publish(self, ticket_id: bytes, wait: Callable[[], None] | None) -> pb.PutReply:
        if wait is not None:
            wait()
        return self._finish(ticket_id)

    def shared_arena(self) -> np.ndarray | None:
        """The node's arena as mapped here, or None when the node is not on this host."""
        segment = self._shared_segment()
        return segment.memory if segment is not None else None

    def get(
        self, keys: Sequence[BlockKey], *, out: memoryview | np.ndarray | None = None
    ) -> list[np.ndarray]:
        """The payloads of the present prefix of `keys`, in order, with their dtype and shape.

        Without `out`, arrays are read-only views of received memory (no copy);
        with `out`, blocks are written back to back into that writable buffer. Encoded
        blocks are decoded into new arrays (`out` then holds their encoded bytes).
        """
        decoder = Decoder(self._pool)
        return decoder.result(self._receive(keys, out, decoder.arrived))

    def _receive(
        self, keys: Sequence[BlockKey], out: memoryview | np.ndarray | None, arrived: Arrived
    ) -> list[tuple[np.ndarray, pb.BlockMeta]]:
        """The stored bytes of the present prefix and their metadata, by the fastest path;
        over TCP, parts go to `arrived` as they land."""
        if segment := self._shared_segment():
            ticket = self._open_get(keys, shared_memory=True)
            return shm.get(segment, ticket, out, self.checksum, self._finish, self._pool)
        if self._tcp_ok:
            try:
                ticket = self._open_get(keys, shared_memory=False)
                return receive_get(self._data, ticket, out, self.checksum, arrived)
            except (Unreachable, Unsupported) as exc:
                self._fall_back(exc)
        assembler = GetAssembler(out, self.checksum)
        try:
            for raw in self._get(get_request(keys), timeout=self.timeout):
                assembler.feed(raw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return assembler.result()

    def lease(self, keys: Sequence[BlockKey]) -> shm.Lease:
        """Zero-copy views of the present prefix of `keys` in the node's shared arena,
        valid until released (use `with`) or expired. Same host only."""
        segment = self._shared_segment()
        if segment is None:
            raise Unsupported("leases need a node on this host with a shared arena")
        return shm.Lease(segment, self._open_get(keys, shared_memory=True), self._finish)

    def push(self, keys: Sequence[BlockKey], target: str, transport: str = "auto") -> pb.PushReply:
        """Ask this node to send the present prefix of `keys` to node `target` (HOST:PORT),
        node to node over the target's data plane; `found`, `stored`, `existed` count blocks."""
        request = pb.PushRequest(keys=check_keys(keys), target=target, transport=transport)
        return pb.PushReply.FromString(self._call("Push", request))

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many leading keys are present."""
        return len(self.lookup_tiers(keys))

    def lookup_tiers(self, keys: Sequence[BlockKey]) -> list[str]:
        """The tier holding each block of the present prefix."""
        request = pb.LookupRequest(keys=pb.GetRequest(keys=check_keys(keys)))
        return list(pb.LookupReply.FromString(self._call("Lookup", request)).tiers)

    def lookup_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> int:
        """How many leading full blocks of a prompt are present, hashed by the node."""
        tokens = pb.TokenPrefix(
            token_ids=check_tokens(token_ids, limit=MAX_TOKENS).astype(np.uint32),
            block_size=block_size,
            salt=salt,
        )
        return pb.LookupReply.FromString(
            self._call("Lookup", pb.LookupRequest(tokens=tokens))
        ).found

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Remove blocks; returns how many were present."""
        request = pb.DeleteRequest(keys=check_keys(keys))
        return pb.DeleteReply.FromString(self._call("Delete", request)).deleted

    def stats(self) -> StoreStats:
        return stats_from_proto(pb.StatsReply.FromString(self._call("Stats", pb.StatsRequest())))

    def close(self) -> None:
        self._close_local()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shared_segment(self) -> shm.SharedSegment | None:
        """The node's arena mapped here, once this host is proven to be the node's."""
        if self._segment is None and self._shm_ok:
            try:
                info = pb.SegmentInfo.FromString(self._call("Segment", pb.StatsRequest()))
                self._segment = shm.SharedSegment(info)
            except Unsupported:
                if self.transport == "shm":
                    raise
                self._shm_ok = False
        return self._segment

    def _open_get(self, keys: Sequence[BlockKey], shared_memory: bool) -> pb.Ticket:
        request = pb.OpenGetRequest(keys=check_keys(keys), shared_memory=shared_memory)
        return pb.Ticket.FromString(self._call("OpenGet", request))

    def _finish(self, ticket_id: bytes) -> pb.PutReply:
        return pb.PutReply.FromString(self._call("Finish", pb.FinishRequest(ticket=ticket_id)))

    def _call(self, name: str, request: object) -> bytes:
        return self._call_with(self._unary[name], request)

    def _call_with(self, method, request) -> bytes:
        if hasattr(request, "SerializeToString"):
            request = request.SerializeToString()
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
