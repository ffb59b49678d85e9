"""Block metadata between the core's types and the wire's messages: the one place both meet."""

from __future__ import annotations

from collections.abc import Iterable

from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.proto import kvstore_pb2 as pb


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


def headers_to_proto(blocks: Iterable[tuple[BlockKey, BlockMeta]]) -> list[pb.BlockHeader]:
    return [pb.BlockHeader(key=key, meta=meta_to_proto(meta)) for key, meta in blocks]


def headers_from_proto(headers: Iterable[pb.BlockHeader]) -> list[tuple[BlockKey, BlockMeta]]:
    return [(h.key, meta_from_proto(h.meta)) for h in headers]
