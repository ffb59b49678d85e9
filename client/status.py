"""gRPC statuses (on gRPC, and as numbers on the data plane) back into kvstore exceptions:
the mirror of kvstore/server/status.py, so a caller catches the same class in process
and remotely."""

from __future__ import annotations

import grpc

from kvstore.errors import (
    Busy,
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from kvstore.proto.channel import BUSY, BUSY_TRAILER

ERRORS: dict[grpc.StatusCode, type[KVStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.DATA_LOSS: CorruptBlock,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.FAILED_PRECONDITION: Unsupported,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error_from_rpc(exc: grpc.RpcError) -> KVStoreError:
    """The kvstore exception for a failed call, with the server's message."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        details += next((hint for cue, hint in _HINTS.items() if cue in details), "")
    busy = BUSY_TRAILER in (getattr(exc, "trailing_metadata", lambda: None)() or ())
    return error_from_status(exc.code(), details, busy)


_HINTS = {  # what the transport says on a TLS mismatch, and what the caller should do
    "Socket closed": " (a TLS mismatch? a node serving TLS drops plaintext connections: pass "
    "tls_ca=; one with --tls-client-ca also those without tls_cert= and tls_key=)",
    "WRONG_VERSION_NUMBER": " (TLS to a node without TLS: leave tls_ca out)",
    "CERTIFICATE_VERIFY_FAILED": " (the node's TLS certificate does not chain to tls_ca)",
}


def error_from_number(status: int, details: str, flags: int = 0) -> KVStoreError:
    """The same for a status number and flags, as the data plane sends them."""
    code = _CODES.get(status, grpc.StatusCode.UNKNOWN)
    return error_from_status(code, details, bool(flags & BUSY))


def error_from_status(code: grpc.StatusCode, details: str, busy: bool = False) -> KVStoreError:
    cls = Busy if busy and code is grpc.StatusCode.RESOURCE_EXHAUSTED else ERRORS.get(code)
    cls = cls or KVStoreError
    if cls is InvalidArgument:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument("", details)
    return cls(f"{code.name}: {details}")
