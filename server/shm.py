"""The shared-memory path's node half, over the Unix socket of clients on this host: a Get
answers where the blocks lie in the arena (the client maps it) and keeps them pinned under
a lease; a Put reserves slots for the client to write, then publishes them on Commit.
Leases and reserved slots end when released or committed, when their connection closes,
or when they expire without being renewed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.errors import Unauthenticated
from kvstore.ingest import SlotPut
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import READY, TRUNCATED, Frame
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import parse
from kvstore.tenants import as_asked

if TYPE_CHECKING:
    from kvstore.server.channel import ChannelServer, Connection


def get(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    asked, keys = server.wanted(conn, frame.meta)
    batch = server.store.pin(keys)
    server.auth.read(conn.tenant, len(keys), [(b.key, b.meta.size) for b in batch.blocks])
    answer = pb.GetAnswer(
        blocks=headers_to_proto(as_asked(asked, ((b.key, b.meta) for b in batch.blocks))),
        truncated=batch.truncated,
        offsets=[server.store.host.segment_offset(b.offset) for b in batch.blocks],
        expires_in_s=server.lease_ttl,
    )
    if batch.blocks:
        answer.lease = conn.hold(batch, server.lease_ttl)
    else:
        batch.close()
    if batch.truncated and not batch.blocks:
        server.transfers.refused_busy()  # no room to bring a stored block up: busy
    server.reply(conn, answer.SerializeToString(), flags=TRUNCATED if batch.truncated else 0)
    server.transfers.add("get/shm", sum(b.meta.size for b in batch.blocks))


def put(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    headers = parse(frame.meta, pb.BlockHeaders)
    blocks = conn.tenant.blocks(headers_from_proto(headers.blocks))
    server.auth.check(conn.tenant, sum(meta.size for _, meta in blocks))
    slots = SlotPut(server.store, blocks, headers.durable)  # may wait for room
    answer = pb.PutAnswer(
        present=slots.present,
        offsets=[server.store.host.segment_offset(s.offset) for *_, s in slots.slots],
        expires_in_s=server.lease_ttl,
    )
    answer.put = conn.hold(slots, server.lease_ttl)
    server.reply(conn, answer.SerializeToString(), flags=READY)


def commit(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    request = parse(frame.meta, pb.Commit)
    held = conn.take(request.put)
    if held is None or not isinstance(held.what, SlotPut):
        raise Unauthenticated("put unknown, already committed, or expired")
    blocks = [(key, meta.size) for _, key, meta, _ in held.what.slots]
    result = held.what.commit(list(request.checksums))  # all or none, as checked
    server.auth.charge(conn.tenant, blocks)
    server.transfers.add("put/shm", sum(size for _, size in blocks))
    reply = pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()
    server.reply(conn, reply)
