"""The TCP path's node half (also what carries small puts over the Unix socket): a Get's
payloads go from pinned arena slots into the socket, a Put's from the socket straight into
reserved slots, one copy each way, in the kernel."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import TYPE_CHECKING

from kvstore.errors import InvalidArgument
from kvstore.ingest import BlockIngest, PutResult
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    INLINE,
    MAX_INLINE,
    READY,
    REPLY_MAGIC,
    TRUNCATED,
    ChannelError,
    Frame,
    encode,
    recv_exact,
    send_views,
)
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import parse
from kvstore.tenants import as_asked

if TYPE_CHECKING:
    from kvstore.server.channel import ChannelServer, Connection

_DRAIN = 1 << 20


def get(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    asked, keys = server.wanted(conn, frame.meta)
    with server.store.read(keys) as batch:
        server.auth.read(conn.tenant, len(keys), [(b.key, b.meta.size) for b in batch.blocks])
        answer = pb.GetAnswer(
            blocks=headers_to_proto(as_asked(asked, ((b.key, b.meta) for b in batch.blocks))),
            truncated=batch.truncated,
        ).SerializeToString()
        size = sum(b.meta.size for b in batch.blocks)
        flags = TRUNCATED if batch.truncated else 0
        if batch.truncated and not batch.blocks:
            server.transfers.refused_busy()  # no room to bring a stored block up: busy
        head = encode(REPLY_MAGIC, 0, flags, answer, size)
        views = [head, *(b.view for b in batch.blocks)]
        with server.transfers.holding(size, conn):
            send_views(conn.sock, views, server.deadline(size))  # straight from pinned slots
    server.transfers.add(f"get/{_path(conn)}", size)


def put(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    """An inline put's bytes follow its metadata; otherwise the node first answers which
    blocks it already has, and only the others' bytes come."""
    inline = bool(frame.flags & INLINE)
    if inline and frame.data_len > MAX_INLINE:  # not worth reading to stay in step: hang up
        refused = InvalidArgument(
            "data", f"{frame.data_len} bytes inline, at most {MAX_INLINE}: send the headers first"
        )
        server.reply_error(conn, refused)
        raise ChannelError(str(refused))
    held = ExitStack()  # the request's bytes, counted in flight until it ends
    ingest: BlockIngest | None = None
    try:
        headers = parse(frame.meta, pb.BlockHeaders)
        blocks = conn.tenant.blocks(headers_from_proto(headers.blocks))
        server.auth.check(conn.tenant, sum(meta.size for _, meta in blocks))
        ingest = BlockIngest(server.store, omit_present=not inline, durable=headers.durable)
        present = ingest.declare(blocks)
        if inline and ingest.pending_bytes != frame.data_len:
            raise InvalidArgument(
                "data", f"{frame.data_len} bytes follow, the blocks declare {ingest.pending_bytes}"
            )
        held.enter_context(server.transfers.holding(ingest.pending_bytes, conn))
    except Exception:
        if ingest is not None:
            ingest.abort()
        drain(server, conn, frame.data_len if inline else 0)
        raise
    with held:
        if not inline:
            answer = pb.PutAnswer(present=present).SerializeToString()
            conn.sock.sendall(encode(REPLY_MAGIC, 0, READY, answer))
        result = _receive(server, conn, ingest)
    server.auth.charge(conn.tenant, ((key, meta.size) for key, meta in blocks))
    server.transfers.add(f"put/{_path(conn)}", sum(meta.size for _, meta in blocks))
    reply = pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()
    server.reply(conn, reply)


def _receive(server: ChannelServer, conn: Connection, ingest: BlockIngest) -> PutResult:
    """A put's payloads, from the socket straight into their slots, within its deadline."""
    deadline = server.deadline(ingest.pending_bytes)
    try:
        while ingest.pending_bytes:
            try:
                n = conn.sock.recv_into(ingest.target())  # one copy: socket -> arena slot
            except BlockingIOError:  # stalled past --data-timeout
                raise TimeoutError(f"stalled with {ingest.pending_bytes} bytes due") from None
            if n == 0:
                raise ConnectionError(f"closed with {ingest.pending_bytes} bytes still due")
            ingest.advance(n)
            if ingest.pending_bytes and time.monotonic() > deadline:
                raise TimeoutError("transfer deadline passed: too slow for --min-rate")
        return ingest.finish()
    except InvalidArgument:  # a bad block (checksum): the rest still comes, and is dropped
        ingest.abort()  # its whole blocks stay, and the error says so
        drain(server, conn, ingest.pending_bytes, deadline)
        raise
    except BaseException:  # refused (no room in time), cut, stalled or too slow
        ingest.abort()
        raise


def drain(
    server: ChannelServer, conn: Connection, nbytes: int, deadline: float | None = None
) -> None:
    """Read and drop the rest of a refused request, so the connection stays in step."""
    deadline = deadline if deadline is not None else server.deadline(nbytes)
    scratch = memoryview(bytearray(min(nbytes, _DRAIN)))
    while nbytes:
        n = min(nbytes, _DRAIN)
        recv_exact(conn.sock, scratch[:n], deadline)
        nbytes -= n


def _path(conn: Connection) -> str:
    return "shm" if conn.kind == "unix" else "tcp"
