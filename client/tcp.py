"""The TCP path: block operations over the node's data plane, one round trip each.

Payloads go out with scatter-gather writes straight from the caller's arrays and come
in with `recv_into` straight into their destination. A put of up to `MAX_INLINE` bytes
sends its payloads with its request, unasked; a larger one first learns which blocks
the node already has, and sends only the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvstore.client.channel import Channels
from kvstore.client.pipeline import Block, Received, batches, block_slices
from kvstore.client.transport import Arrived, Ask, Out
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import GET, INLINE, LOOKUP, MAX_INLINE, PUT, TRUNCATED, recv_exact
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.results import PutResult

Place = Callable[[list[Block]], list[memoryview]]  # where each block of an answer goes
RECEIVE_PART = 16 << 20  # bytes received before the blocks so far go to be decoded


class TcpTransport:
    name = "tcp"

    def __init__(self, channels: Channels) -> None:
        self.channels = channels

    def put(
        self, blocks: Sequence[Block], views: Sequence[memoryview], durable: bool = False
    ) -> PutResult:
        return put(self.channels, blocks, views, durable)

    def get(self, ask: Ask, out: Out, arrived: Arrived | None) -> Received:
        return get(self.channels, ask, out, arrived)

    def lookup(self, ask: Ask) -> list[str]:
        return lookup(self.channels, ask)

    def close(self) -> None:
        self.channels.close()


def put(
    channels: Channels,
    blocks: Sequence[Block],
    views: Sequence[memoryview],
    durable: bool = False,
) -> PutResult:
    meta = pb.BlockHeaders(blocks=headers_to_proto(blocks), durable=durable).SerializeToString()
    total = sum(len(v) for v in views)
    with channels.link() as link:
        if total <= MAX_INLINE:
            frame = channels.request(link, PUT, meta, flags=INLINE, views=views, data_len=total)
        else:
            ready = channels.request(link, PUT, meta)
            present = set(pb.PutAnswer.FromString(ready.meta).present)
            channels.send(link, [v for i, v in enumerate(views) if i not in present])
            frame = channels.answer(link)
    reply = pb.PutReply.FromString(frame.meta)
    return PutResult(reply.stored, reply.existed)


def get(
    channels: Channels,
    ask: Ask,
    out: Out,
    arrived: Arrived | None,
) -> Received:
    """Receive the present prefix into one buffer (or `out`), each block straight into
    place; with `arrived`, large answers go to it in parts as they land (checking and
    decoding overlap the rest)."""
    with channels.link() as link:
        frame = channels.request(link, GET, ask.message())
        blocks = headers_from_proto(pb.GetAnswer.FromString(frame.meta).blocks)
        span, arrays = block_slices([meta for _, meta in blocks], out)
        if arrived is None or len(span) <= RECEIVE_PART:
            recv_exact(link.sock, span.data)  # one copy: kernel -> destination
        else:
            sizes = [meta.size for _, meta in blocks]
            start = 0
            for part in batches(sizes, RECEIVE_PART):
                end = start + sum(sizes[part])
                recv_exact(link.sock, span.data[start:end])
                start = end
                arrived(arrays[part], blocks[part])
    return Received(arrays, blocks, bool(frame.flags & TRUNCATED))


def lookup(channels: Channels, ask: Ask) -> list[str]:
    with channels.link() as link:
        frame = channels.request(link, LOOKUP, ask.message())
    return list(pb.LookupReply.FromString(frame.meta).tiers)


def get_into(channels: Channels, ask: Ask, place: Place, landed: Callable[[int], None]) -> int:
    """The present prefix received straight into the memory `place` hands out, one buffer
    per block; `landed(i)` as each is whole (see `Client.get_into`)."""
    with channels.link() as link:
        frame = channels.request(link, GET, ask.message())
        blocks = headers_from_proto(pb.GetAnswer.FromString(frame.meta).blocks)
        dests = place(blocks) if blocks else []
        for i, dest in enumerate(dests):
            recv_exact(link.sock, memoryview(dest))  # one copy: kernel -> the caller's memory
            landed(i)
    return len(blocks)
