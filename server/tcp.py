"""The TCP path's node half (also what carries small puts over the Unix socket): a Get's
payloads go from pinned arena slots into the socket, a Put's from the socket straight into
reserved slots, one copy each way, in the kernel."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kvstore.errors import InvalidArgument
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
from kvstore.results import PutResult

if TYPE_CHECKING:
    from kvstore.server.channel import ChannelServer, Connection
    from kvstore.server.policy import Put

_DRAIN = 1 << 20


def get(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    with server.policy.get(conn.caller(), server.ask(frame.meta)) as found:
        answer = pb.GetAnswer(
            blocks=headers_to_proto(found.headers), truncated=found.truncated
        ).SerializeToString()
        head = encode(REPLY_MAGIC, 0, TRUNCATED if found.truncated else 0, answer, found.nbytes)
        deadline = server.deadline(found.nbytes)
        send_views(conn.sock, [head, *found.views], deadline)  # straight from pinned slots


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
    sending = False  # the caller was told to send, or its inline bytes are taken
    try:
        with server.policy.put(conn.caller(), omit_present=not inline) as put:
            headers = parse(frame.meta, pb.BlockHeaders)
            present = put.declare(headers_from_proto(headers.blocks), headers.durable)
            if inline and put.pending != frame.data_len:
                raise InvalidArgument(
                    "data", f"{frame.data_len} bytes follow, the blocks declare {put.pending}"
                )
            put.begin()
            sending = True
            if not inline:
                answer = pb.PutAnswer(present=present).SerializeToString()
                conn.sock.sendall(encode(REPLY_MAGIC, 0, READY, answer))
            result = _receive(server, conn, put)
    except Exception:
        if not sending:  # refused: its inline bytes are read and dropped, to stay in step
            drain(server, conn, frame.data_len if inline else 0)
        raise
    reply = pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()
    server.reply(conn, reply)


def _receive(server: ChannelServer, conn: Connection, put: Put) -> PutResult:
    """A put's payloads, from the socket straight into their slots, within its deadline."""
    deadline = server.deadline(put.pending)
    try:
        while put.pending:
            try:
                n = conn.sock.recv_into(put.target())  # one copy: socket -> arena slot
            except BlockingIOError:  # stalled past --data-timeout
                raise TimeoutError(f"stalled with {put.pending} bytes due") from None
            if n == 0:
                raise ConnectionError(f"closed with {put.pending} bytes still due")
            put.advance(n)
            if put.pending and time.monotonic() > deadline:
                raise TimeoutError("transfer deadline passed: too slow for --min-rate")
        return put.finish()
    except InvalidArgument:  # a bad block (checksum): the rest still comes, and is dropped
        put.abort()  # its whole blocks stay, and the error says so
        drain(server, conn, put.pending, deadline)
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
