"""The gRPC path, the one that always works: a Put stream of header frames then data
frames, a Get stream answered the same way, a Lookup call. Data frames are encoded and
decoded by hand (kvstore/proto/frames.py), so a payload is copied once per side."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence

import grpc
import numpy as np

from kvstore.client.pipeline import Block, Received, block_slices
from kvstore.client.status import error_from_rpc
from kvstore.client.transport import Arrived, Ask, Out
from kvstore.errors import KVStoreError, Unavailable
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import data_frames, decode_frame
from kvstore.results import PutResult

SERVICE = "/kvstore.v1.KVStore/"
HEADERS_PER_FRAME = 4096
MAX_MESSAGE = 256 << 20
# A node that cannot be reached for now answers UNAVAILABLE: gRPC itself tries unary calls
# again, with backoff. Not streams: gRPC replays only the first 256 KiB of a client stream
# (Put), and grpc-core 1.85 aborts the process ("ILLEGAL STATE: FORWARDED_BATCH") retrying
# one refused while its data still flows; a server stream (Get, Watch) cut by its node's
# death, retried, outlives its deadline. A busy refusal (RESOURCE_EXHAUSTED) is the
# client's to retry (`busy_retried`), and no other is retried.
_METHODS = pb.DESCRIPTOR.services_by_name["KVStore"].methods
RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [
                {"service": "kvstore.v1.KVStore", "method": m.name}
                for m in _METHODS
                if not (m.client_streaming or m.server_streaming)
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(RETRY_POLICY)),
]


class GrpcTransport:
    name = "grpc"

    def __init__(
        self,
        channel: grpc.Channel,
        chunk_size: int,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        self.metadata = metadata  # the tenant's token, on every call
        self._put = channel.stream_unary(SERVICE + "Put")
        self._get = channel.unary_stream(SERVICE + "Get")
        self._lookup = channel.unary_unary(SERVICE + "Lookup")
        self.chunk_size = chunk_size
        self.timeout = timeout

    def put(
        self, blocks: Sequence[Block], views: Sequence[memoryview], durable: bool = False
    ) -> PutResult:
        frames = put_frames(blocks, views, self.chunk_size, durable)
        try:
            reply = pb.PutReply.FromString(
                self._put(frames, timeout=self.timeout, metadata=self.metadata)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return PutResult(reply.stored, reply.existed)

    def get(self, ask: Ask, out: Out, arrived: Arrived | None) -> Received:
        assembler = GetAssembler(out)
        try:
            for raw in self._get(ask.message(), timeout=self.timeout, metadata=self.metadata):
                assembler.feed(raw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return Received(*assembler.result())

    def lookup(self, ask: Ask) -> list[str]:
        keys = pb.GetRequest(keys=ask.keys, wait_ms=ask.wait_ms, fetch=ask.fetch)
        request = pb.LookupRequest(keys=keys).SerializeToString()
        try:
            reply = self._lookup(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return list(pb.LookupReply.FromString(reply).tiers)

    def close(self) -> None:
        pass  # the client owns the channel


def put_frames(
    blocks: Sequence[Block], views: Sequence[memoryview], chunk_size: int, durable: bool = False
) -> Iterator[bytes]:
    """Header frames for the whole batch, then the payloads as data frames (built lazily,
    as gRPC sends them)."""
    headers = headers_to_proto(blocks)
    header_frames = [
        pb.PutRequest(
            headers=pb.BlockHeaders(blocks=headers[i : i + HEADERS_PER_FRAME], durable=durable)
        ).SerializeToString()
        for i in range(0, len(headers), HEADERS_PER_FRAME)
    ]
    data = (frame for frame, _ in data_frames(views, chunk_size))
    return itertools.chain(header_frames, data)


class GetAssembler:
    """Rebuilds the blocks of a Get reply from its frames, in order.

    A block that arrives inside one frame is returned as a read-only view of that frame
    (no copy); a block cut across frames, or any block when `out` is given, is copied
    once into its place.
    """

    def __init__(self, out: Out) -> None:
        self._out = out
        self._blocks: list[Block] | None = None
        self._truncated = False
        self._slots: list[np.ndarray] | None = None  # with `out`: where each block goes
        self._arrays: list[np.ndarray] = []
        self._partial: np.ndarray | None = None
        self._filled = 0

    def feed(self, raw: bytes) -> None:
        frame = decode_frame(raw, pb.GetReply)
        if isinstance(frame, memoryview):
            self._feed_data(np.frombuffer(frame, np.uint8))
        elif frame.HasField("headers") and self._blocks is None:
            self._blocks = headers_from_proto(frame.headers.blocks)
            self._truncated = frame.headers.truncated
            if self._out is not None:
                self._slots = block_slices([m for _, m in self._blocks], self._out)[1]
        else:
            raise KVStoreError("unexpected frame in Get reply")

    def result(self) -> tuple[list[np.ndarray], list[Block], bool]:
        if self._blocks is None or len(self._arrays) != len(self._blocks):
            raise Unavailable("Get reply ended before all blocks arrived")
        return self._arrays, self._blocks, self._truncated

    def _feed_data(self, data: np.ndarray) -> None:
        blocks = self._blocks
        if blocks is None:
            raise KVStoreError("Get reply sent data before headers")
        while len(data):
            if len(self._arrays) >= len(blocks):
                raise KVStoreError("Get reply sent more bytes than its headers declared")
            size = blocks[len(self._arrays)][1].size
            if self._partial is None and self._slots is None and len(data) >= size:
                self._arrays.append(data[:size])  # whole in this frame: a view, no copy
                data = data[size:]
                continue
            if self._partial is None:
                self._partial = (
                    np.empty(size, np.uint8)
                    if self._slots is None
                    else self._slots[len(self._arrays)]
                )
            n = min(size - self._filled, len(data))
            self._partial[self._filled : self._filled + n] = data[:n]  # one copy: frame -> block
            self._filled += n
            data = data[n:]
            if self._filled == size:
                self._arrays.append(self._partial)
                self._partial, self._filled = None, 0
