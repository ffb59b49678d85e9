"""The synchronous client that serving engines embed."""

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
from kvstore.ingest import PutResult
from kvstore.keys import BlockKey, check_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.store import StoreStats

DEFAULT_CHUNK = 1 << 20


class Client:
    """Batch calls over one channel; thread-safe, so one client can serve many threads.

    Prefix semantics: `lookup` counts the leading keys present, `get` returns the
    leading blocks present (fewer than asked at the first missing key, never an
    error). Errors raise `kvstore.KVStoreError` subclasses.
    """

    def __init__(
        self,
        address: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float | None = None,
        checksum: bool = False,
    ) -> None:
        """`checksum`: send an xxh3 of every payload (the node verifies it) and verify on get."""
        self.address = address
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.checksum = checksum
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._put = self._channel.stream_unary(SERVICE + "Put")
        self._get = self._channel.unary_stream(SERVICE + "Get")
        self._lookup = self._channel.unary_unary(SERVICE + "Lookup")
        self._delete = self._channel.unary_unary(SERVICE + "Delete")
        self._stats = self._channel.unary_unary(SERVICE + "Stats")

    def put(self, keys: Sequence[BlockKey], payloads: Sequence[Payload]) -> PutResult:
        """Store one payload per key (bytes-like or numpy arrays, 1 B and up) in one stream."""
        frames = put_frames(keys, payloads, self.chunk_size, self.checksum)
        reply = pb.PutReply.FromString(self._call(self._put, frames))
        return PutResult(reply.stored, reply.existed)

    def get(
        self, keys: Sequence[BlockKey], *, out: memoryview | np.ndarray | None = None
    ) -> list[np.ndarray]:
        """The payloads of the present prefix of `keys`, in order, with their dtype and shape.

        Without `out`, arrays are read-only views of the received frames (no copy);
        with `out`, blocks are written back to back into that writable buffer.
        """
        assembler = GetAssembler(out, self.checksum)
        try:
            for raw in self._get(get_request(keys), timeout=self.timeout):
                assembler.feed(raw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return assembler.result()

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many leading keys are present."""
        return len(self.lookup_tiers(keys))

    def lookup_tiers(self, keys: Sequence[BlockKey]) -> list[str]:
        """The tier holding each block of the present prefix."""
        request = pb.LookupRequest(keys=pb.GetRequest(keys=check_keys(keys)))
        return list(pb.LookupReply.FromString(self._call(self._lookup, request)).tiers)

    def lookup_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> int:
        """How many leading full blocks of a prompt are present, hashed by the node."""
        tokens = pb.TokenPrefix(
            token_ids=np.asarray(token_ids, np.uint32).tolist(), block_size=block_size, salt=salt
        )
        reply = pb.LookupReply.FromString(self._call(self._lookup, pb.LookupRequest(tokens=tokens)))
        return reply.found

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Remove blocks; returns how many were present."""
        request = pb.DeleteRequest(keys=check_keys(keys))
        return pb.DeleteReply.FromString(self._call(self._delete, request)).deleted

    def stats(self) -> StoreStats:
        return stats_from_proto(
            pb.StatsReply.FromString(self._call(self._stats, pb.StatsRequest()))
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request) -> bytes:
        if hasattr(request, "SerializeToString"):
            request = request.SerializeToString()
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
