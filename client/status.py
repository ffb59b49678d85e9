"""A failed call's status, as gRPC or the data plane carries it, back into the kvstore
exception the node raised (the table is kvstore/proto/status.py)."""

from __future__ import annotations

import grpc

from kvstore.errors import KVStoreError
from kvstore.proto.channel import BUSY, BUSY_TRAILER
from kvstore.proto.status import CODES, error_of

_HINTS = {  # what the transport says on a TLS mismatch, and what the caller should do
    "Socket closed": " (a TLS mismatch? a node serving TLS drops plaintext connections: pass "
    "tls_ca=; one with --tls-client-ca also those without tls_cert= and tls_key=)",
    "WRONG_VERSION_NUMBER": " (TLS to a node without TLS: leave tls_ca out)",
    "CERTIFICATE_VERIFY_FAILED": " (the node's TLS certificate does not chain to tls_ca)",
}


def error_from_rpc(exc: grpc.RpcError) -> KVStoreError:
    """The kvstore exception for a failed call, with the node's message."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        details += next((hint for cue, hint in _HINTS.items() if cue in details), "")
    busy = BUSY_TRAILER in (getattr(exc, "trailing_metadata", lambda: None)() or ())
    return error_of(exc.code(), details, busy)


def error_from_number(status: int, details: str, flags: int = 0) -> KVStoreError:
    """The same for a status number and flags, as the data plane sends them."""
    return error_of(CODES.get(status, grpc.StatusCode.UNKNOWN), details, bool(flags & BUSY))
