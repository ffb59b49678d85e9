"""The data plane's framing (see DATAPLANE.md): a preamble, raw payloads, a trailer."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

PREAMBLE = struct.Struct("!4s16s")
MAGIC = b"KVD1"
TRAILER = struct.Struct("!4sIIII")
TRAILER_MAGIC = b"KVR1"
IOV_BATCH = 64  # views per sendmsg call; well under IOV_MAX


@dataclass(frozen=True, slots=True)
class Trailer:
    status: int  # 0: ok, else a gRPC status code
    stored: int = 0
    existed: int = 0
    message: str = ""

    def encode(self) -> bytes:
        text = self.message.encode()
        return TRAILER.pack(TRAILER_MAGIC, self.status, self.stored, self.existed, len(text)) + text


def recv_exact(sock: socket.socket, into: memoryview) -> None:
    """Fill `into` from the socket, or raise ConnectionError if it closes first."""
    got = 0
    while got < len(into):
        n = sock.recv_into(into[got:])
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {len(into)} bytes")
        got += n


def read_trailer(sock: socket.socket) -> Trailer:
    head = memoryview(bytearray(TRAILER.size))
    recv_exact(sock, head)
    magic, status, stored, existed, length = TRAILER.unpack(head)
    if magic != TRAILER_MAGIC:
        raise ConnectionError("data plane: malformed trailer")
    text = memoryview(bytearray(length))
    recv_exact(sock, text)
    return Trailer(status, stored, existed, bytes(text).decode(errors="replace"))


def send_views(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Send `views` back to back with scatter-gather writes: no copy, no join."""
    for start in range(0, len(views), IOV_BATCH):
        pending = [v for v in views[start : start + IOV_BATCH] if len(v)]
        while pending:
            sent = sock.sendmsg(pending)
            while pending and sent >= len(pending[0]):
                sent -= len(pending[0])
                pending.pop(0)
            if pending and sent:
                pending[0] = pending[0][sent:]
