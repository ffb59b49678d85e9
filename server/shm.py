"""The shared-memory path's node half, over the Unix socket of clients on this host: a Get
answers where the blocks lie in the arena (the client maps it) and keeps them pinned under
a lease; a Put reserves slots for the client to write, then publishes them on Commit.
Leases and reserved slots end when released or committed, when their connection closes,
or when they expire without being renewed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.errors import Unauthenticated
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import READY, TRUNCATED, Frame
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import parse
from kvstore.server.policy import PutSlots

if TYPE_CHECKING:
    from kvstore.server.channel import ChannelServer, Connection


def get(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    lease = server.policy.lease(conn.caller(), server.ask(frame.meta))
    answer = pb.GetAnswer(
        blocks=headers_to_proto(lease.headers),
        truncated=lease.truncated,
        offsets=[server.store.host.segment_offset(b.offset) for b in lease.blocks],
        expires_in_s=server.lease_ttl,
    )
    if lease.blocks:
        answer.lease = conn.hold(lease, server.lease_ttl)
    else:
        lease.end()
    server.reply(conn, answer.SerializeToString(), flags=TRUNCATED if lease.truncated else 0)


def put(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    headers = parse(frame.meta, pb.BlockHeaders)
    blocks = headers_from_proto(headers.blocks)
    slots = server.policy.reserve(conn.caller(), blocks, headers.durable)  # may wait for room
    answer = pb.PutAnswer(
        present=slots.present,
        offsets=[server.store.host.segment_offset(s.offset) for s in slots.reservations],
        expires_in_s=server.lease_ttl,
    )
    answer.put = conn.hold(slots, server.lease_ttl)
    server.reply(conn, answer.SerializeToString(), flags=READY)


def commit(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    request = parse(frame.meta, pb.Commit)
    held = conn.take(request.put)
    if held is None or not isinstance(held.what, PutSlots):
        if held is not None:
            held.end()  # a lease named as a put: taken all the same, so not left pinned
        raise Unauthenticated("put unknown, already committed, or expired")
    result = server.policy.commit(
        conn.caller(), held.what, request.checksums, unhashed=request.hash_here
    )
    reply = pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()
    server.reply(conn, reply)
