"""The request channel's framing (DATAPLANE.md), shared by the client and the node.

A frame is a fixed header, then `meta_len` bytes of one protobuf message of this
contract (which one depends on the operation), then `data_len` bytes of raw
payloads back to back. Payloads never pass through protobuf: they go from memory
into the socket with scatter-gather writes and from the socket into their place
with `recv_into`.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.errors import Unavailable

HELLO = struct.Struct("!4sH2x16s16s")  # magic, version, channel ticket, token proof
HELLO_MAGIC = b"KVC1"
HELLO_REPLY = struct.Struct("!4sBxH16sQ")  # magic, status, message length, node id, arena size
VERSION = 2
HEADER = struct.Struct("!2sBBIQ")  # magic, op or status, flags, meta length, data length
REQUEST_MAGIC, REPLY_MAGIC = b"KQ", b"KA"

# operations
GET, PUT, COMMIT, LOOKUP, RELEASE, RENEW = 1, 2, 3, 4, 5, 6
NIXL_SESSION, NIXL_GET, NIXL_PUT = 7, 8, 9  # payloads through NIXL (DATAPLANE.md, "NIXL")
SESSION_ENDED = "NIXL session unknown, or ended"  # an Unavailable's words: open another
OPS = {GET: "get", PUT: "put", COMMIT: "commit", LOOKUP: "lookup", RELEASE: "release"}
OPS |= {RENEW: "renew", NIXL_SESSION: "nixl session", NIXL_GET: "nixl get", NIXL_PUT: "nixl put"}
NO_REPLY = (RELEASE, RENEW)  # sent ahead of the next request; answered by nothing

# request flags
SHM = 0x01  # GET: answer with arena offsets under a lease; PUT: reserve slots to write
INLINE = 0x02  # PUT: the payloads follow the metadata at once, unasked
# reply flags
TRUNCATED = 0x01  # GET: stopped before a missing key (room, limits): ask again for the rest
READY = 0x02  # PUT: the node names what to send (or where to write), then waits
BUSY = 0x04  # an error answer: the node is busy for now, the same request may succeed soon
BUSY_TRAILER = ("kvstore-busy", "1")  # gRPC's way of saying BUSY, on a RESOURCE_EXHAUSTED


def hello_frame(ticket: bytes, token: str = "") -> bytes:
    return HELLO.pack(HELLO_MAGIC, VERSION, ticket, ticket_proof(ticket, token))


def ticket_proof(ticket: bytes, token: str) -> bytes:
    """That the caller holds the token its ticket was issued for, without sending it: a
    ticket seen on the wire is no use with another token, nor twice."""
    if not token:
        return bytes(16)
    key = hashlib.blake2b(token.encode(), digest_size=32).digest()
    return hashlib.blake2b(ticket, key=key, digest_size=16).digest()


MAX_INLINE = 4 << 20  # payload bytes a put may send with its request, before the node answers
IOV_BATCH = 64  # views per sendmsg call; well under IOV_MAX
MAX_META = 16 << 20  # bytes of metadata in one frame


class ChannelError(Unavailable):
    """The connection broke, or carried something that is not this protocol."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int  # op of a request, status of a reply
    flags: int
    meta: bytes
    data_len: int


def encode(magic: bytes, kind: int, flags: int, meta: bytes, data_len: int = 0) -> bytes:
    return HEADER.pack(magic, kind, flags, len(meta), data_len) + meta


def unpack_header(head: bytes | bytearray | memoryview, magic: bytes) -> tuple[int, int, int, int]:
    """A whole frame header's op or status, flags, metadata length and data length;
    ChannelError if it is not this protocol's."""
    got, kind, flags, meta_len, data_len = HEADER.unpack(head)
    if got != magic:
        raise ChannelError(f"not a kvstore frame (starts with {bytes(head[:2])!r})")
    if meta_len > MAX_META:
        raise ChannelError(f"frame metadata of {meta_len} bytes: at most {MAX_META}")
    return kind, flags, meta_len, data_len


def read_frame(sock: socket.socket, magic: bytes, head: memoryview | None = None) -> Frame:
    """The next frame's header and metadata (its data is left for the caller to read)."""
    head = head if head is not None else memoryview(bytearray(HEADER.size))
    recv_exact(sock, head)
    kind, flags, meta_len, data_len = unpack_header(head, magic)
    meta = bytearray(meta_len)
    recv_exact(sock, memoryview(meta))
    return Frame(kind, flags, bytes(meta), data_len)


def stall_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Let each socket call wait at most `seconds` (None: for ever), set once in the kernel
    (SO_RCVTIMEO, SO_SNDTIMEO). Python's own socket timeouts would poll() before every
    call: twice the system calls on a path where each costs as much as the work."""
    sock.settimeout(None)
    micros = 0 if seconds is None else max(int(seconds * 1e6), 1)
    timeval = struct.pack("ll", micros // 1_000_000, micros % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def recv_exact(sock: socket.socket, into: memoryview, deadline: float | None = None) -> None:
    """Fill `into` from the socket, or raise ChannelError if it closes first, TimeoutError
    if it stalls (see `stall_timeout`) or, with a `deadline` (time.monotonic()), once that
    passes, however the bytes trickle in."""
    got = 0
    while got < len(into):
        try:
            n = sock.recv_into(into[got:])
        except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO passed, nothing came
            raise TimeoutError(f"stalled after {got} of {len(into)} bytes") from None
        if n == 0:
            raise ChannelError(f"connection closed after {got} of {len(into)} bytes")
        got += n
        if deadline is not None and got < len(into) and time.monotonic() > deadline:
            raise TimeoutError(f"transfer deadline passed after {got} of {len(into)} bytes")


def _send_tls(
    sock: ssl.SSLSocket, views: Sequence[memoryview | bytes], deadline: float | None
) -> None:
    small: list[memoryview | bytes] = []  # frame heads go out together, payloads as they are
    for view in [*views, b""]:
        if 0 < len(view) < 4096:
            small.append(view)
            continue
        try:
            if small:
                sock.sendall(b"".join(small))
                small.clear()
            if len(view):
                sock.sendall(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            raise TimeoutError("the peer stopped reading") from None
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("transfer deadline passed while the peer was reading")


def send_views(
    sock: socket.socket,
    views: Sequence[memoryview | bytes],
    deadline: float | None = None,
) -> None:
    """Send `views` back to back with scatter-gather writes: no copy, no join. TimeoutError
    if the peer stops reading (see `stall_timeout`) or, with a `deadline`, once it passes."""
    if isinstance(sock, ssl.SSLSocket):  # TLS has no scatter-gather: one record per view
        _send_tls(sock, views, deadline)
        return
    for start in range(0, len(views), IOV_BATCH):
        pending = [memoryview(v) for v in views[start : start + IOV_BATCH] if len(v)]
        while pending:
            try:
                sent = sock.sendmsg(pending)
            except BlockingIOError:  # SO_SNDTIMEO passed with nothing sent
                raise TimeoutError("the peer stopped reading") from None
            while pending and sent >= len(pending[0]):
                sent -= len(pending[0])
                pending.pop(0)
            if pending and sent:
                pending[0] = pending[0][sent:]
            if pending and deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("transfer deadline passed while the peer was reading")
