"""The asyncio client: the same calls as `Client`, awaitable."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from kvstore.client._wire import (
    CHANNEL_OPTIONS,
    SERVICE,
    GetAssembler,
    Payload,
    error_from_rpc,
    get_request,
    put_frames,
    stats_from_proto,
)
from kvstore.client.client import DEFAULT_CHUNK
from kvstore.ingest import PutResult
from kvstore.keys import BlockKey, check_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.store import StoreStats


class AsyncClient:
    """See `kvstore.client.Client`; every method here is a coroutine."""

    def __init__(
        self,
        address: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float | None = None,
        checksum: bool = False,
    ) -> None:
        self.address = address
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.checksum = checksum
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._put = self._channel.stream_unary(SERVICE + "Put")
        self._get = self._channel.unary_stream(SERVICE + "Get")
        self._lookup = self._channel.unary_unary(SERVICE + "Lookup")
        self._delete = self._channel.unary_unary(SERVICE + "Delete")
        self._stats = self._channel.unary_unary(SERVICE + "Stats")

    async def put(self, keys: Sequence[BlockKey], payloads: Sequence[Payload]) -> PutResult:
        frames = put_frames(keys, payloads, self.chunk_size, self.checksum)
        reply = pb.PutReply.FromString(await self._call(self._put, frames))
        return PutResult(reply.stored, reply.existed)

    async def get(
        self, keys: Sequence[BlockKey], *, out: memoryview | np.ndarray | None = None
    ) -> list[np.ndarray]:
        assembler = GetAssembler(out, self.checksum)
        try:
            async for raw in self._get(get_request(keys), timeout=self.timeout):
                assembler.feed(raw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return assembler.result()

    async def lookup(self, keys: Sequence[BlockKey]) -> int:
        return len(await self.lookup_tiers(keys))

    async def lookup_tiers(self, keys: Sequence[BlockKey]) -> list[str]:
        request = pb.LookupRequest(keys=pb.GetRequest(keys=check_keys(keys)))
        return list(pb.LookupReply.FromString(await self._call(self._lookup, request)).tiers)

    async def lookup_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> int:
        tokens = pb.TokenPrefix(
            token_ids=np.asarray(token_ids, np.uint32).tolist(), block_size=block_size, salt=salt
        )
        request = pb.LookupRequest(tokens=tokens)
        return pb.LookupReply.FromString(await self._call(self._lookup, request)).found

    async def delete(self, keys: Sequence[BlockKey]) -> int:
        request = pb.DeleteRequest(keys=check_keys(keys))
        return pb.DeleteReply.FromString(await self._call(self._delete, request)).deleted

    async def stats(self) -> StoreStats:
        reply = await self._call(self._stats, pb.StatsRequest())
        return stats_from_proto(pb.StatsReply.FromString(reply))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method, request) -> bytes:
        if hasattr(request, "SerializeToString"):
            request = request.SerializeToString()
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
