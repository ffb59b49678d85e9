"""The asyncio client: the same calls as `Client`, awaitable.

Control calls use grpc.aio; data-plane transfers run the same socket code as
the sync client in a worker thread (the GIL is released inside every send and
receive), so they overlap with the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np

from kvstore.client._wire import (
    CHANNEL_OPTIONS,
    Decoder,
    GetAssembler,
    Payload,
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


class AsyncClient(ClientBase):
    """See `kvstore.client.Client`; every method here is a coroutine.

    Transfers take the TCP data plane or gRPC; shared memory and leases are the
    sync client's (`transport="shm"` is refused here).
    """

    def _open(self) -> None:
        if self.transport == "shm":
            raise Unsupported("AsyncClient moves bytes over tcp or grpc; use Client for shm")
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._put, self._get, self._unary = bind(self._channel)

    async def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        *,
        codec: str | None = None,
        layout: str | None = None,
    ) -> PutResult:
        encoding = self._encoding(codec, layout, payloads)
        if self._capacity is None:  # fixed for the node's life: asked once
            self._capacity = sum(tier.capacity for tier in (await self.stats()).tiers)
        capacity = self._capacity
        check_batch(keys, payloads)
        self._check_fits(capacity, [payload_size(p) for p in payloads])  # raw: an upper bound
        parts = encoded_parts(keys, payloads, encoding, self._pool)
        result = PutResult(0, 0)
        while part := await asyncio.to_thread(next, parts, None):  # waits off the event loop
            result += await self._put_encoded(*part)
        return result

    async def _put_encoded(
        self, headers: list[pb.BlockHeader], views: list[memoryview]
    ) -> PutResult:
        if self._tcp_ok:
            try:
                reply = await self._call("OpenPut", pb.OpenPutRequest(blocks=headers))
                ticket = pb.Ticket.FromString(reply)
                return await asyncio.to_thread(send_put, self._data, ticket, views)
            except (Unreachable, Unsupported) as exc:
                self._fall_back(exc)
        frames = put_frames(headers, views, self.chunk_size)
        reply = pb.PutReply.FromString(await self._call_with(self._put, frames))
        return PutResult(reply.stored, reply.existed)

    async def get(
        self, keys: Sequence[BlockKey], *, out: memoryview | np.ndarray | None = None
    ) -> list[np.ndarray]:
        decoder = Decoder(self._pool)
        blocks = await self._receive(keys, out, decoder.arrived)
        return await asyncio.to_thread(decoder.result, blocks)

    async def _receive(
        self, keys: Sequence[BlockKey], out: memoryview | np.ndarray | None, arrived: Arrived
    ) -> list[tuple[np.ndarray, pb.BlockMeta]]:
        if self._tcp_ok:
            try:
                request = pb.OpenGetRequest(keys=check_keys(keys))
                ticket = pb.Ticket.FromString(await self._call("OpenGet", request))
                return await asyncio.to_thread(
                    receive_get, self._data, ticket, out, self.checksum, arrived
                )
            except (Unreachable, Unsupported) as exc:
                self._fall_back(exc)
        assembler = GetAssembler(out, self.checksum)
        try:
            async for raw in self._get(get_request(keys), timeout=self.timeout):
                assembler.feed(raw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return assembler.result()

    async def push(
        self, keys: Sequence[BlockKey], target: str, transport: str = "auto"
    ) -> pb.PushReply:
        request = pb.PushRequest(keys=check_keys(keys), target=target, transport=transport)
        return pb.PushReply.FromString(await self._call("Push", request))

    async def lookup(self, keys: Sequence[BlockKey]) -> int:
        return len(await self.lookup_tiers(keys))

    async def lookup_tiers(self, keys: Sequence[BlockKey]) -> list[str]:
        request = pb.LookupRequest(keys=pb.GetRequest(keys=check_keys(keys)))
        return list(pb.LookupReply.FromString(await self._call("Lookup", request)).tiers)

    async def lookup_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> int:
        tokens = pb.TokenPrefix(
            token_ids=check_tokens(token_ids, limit=MAX_TOKENS).astype(np.uint32),
            block_size=block_size,
            salt=salt,
        )
        reply = await self._call("Lookup", pb.LookupRequest(tokens=tokens))
        return pb.LookupReply.FromString(reply).found

    async def delete(self, keys: Sequence[BlockKey]) -> int:
        request = pb.DeleteRequest(keys=check_keys(keys))
        return pb.DeleteReply.FromString(await self._call("Delete", request)).deleted

    async def stats(self) -> StoreStats:
        reply = await self._call("Stats", pb.StatsRequest())
        return stats_from_proto(pb.StatsReply.FromString(reply))

    async def close(self) -> None:
        self._close_local()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, name: str, request: object) -> bytes:
        return await self._call_with(self._unary[name], request)

    async def _call_with(self, method, request) -> bytes:
        if hasattr(request, "SerializeToString"):
            request = request.SerializeToString()
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
