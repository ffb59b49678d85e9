"""Each kvstore exception's status on the wire, and back: one table for the node and the
client, so a caller catches the same class in process and remotely.

A status is a gRPC code and a busy flag: `Busy` is a RESOURCE_EXHAUSTED with the flag
set (the same request may pass after a pause), which gRPC carries as `BUSY_TRAILER` and
the data plane as its `BUSY` reply flag. Any other RESOURCE_EXHAUSTED (a quota, a batch
too large) is final.
"""

from __future__ import annotations

import grpc

from kvstore.errors import (
    Busy,
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    LeaseExpired,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from kvstore.proto.frames import FrameError

Code = grpc.StatusCode
STATUSES: dict[type[Exception], tuple[grpc.StatusCode, bool]] = {
    InvalidArgument: (Code.INVALID_ARGUMENT, False),
    Busy: (Code.RESOURCE_EXHAUSTED, True),
    ResourceExhausted: (Code.RESOURCE_EXHAUSTED, False),
    NotFound: (Code.NOT_FOUND, False),
    CorruptBlock: (Code.DATA_LOSS, False),
    Unavailable: (Code.UNAVAILABLE, False),
    Unauthenticated: (Code.UNAUTHENTICATED, False),
    PermissionDenied: (Code.PERMISSION_DENIED, False),
    OutOfRange: (Code.OUT_OF_RANGE, False),
    Unsupported: (Code.FAILED_PRECONDITION, False),
    LeaseExpired: (Code.ABORTED, False),
    FrameError: (Code.INVALID_ARGUMENT, False),  # a malformed message: the caller's
}
ERRORS: dict[tuple[grpc.StatusCode, bool], type[KVStoreError]] = {
    status: cls for cls, status in STATUSES.items() if issubclass(cls, KVStoreError)
}
ERRORS[Code.DEADLINE_EXCEEDED, False] = Unavailable  # gRPC's own: the call did not finish
ERRORS[Code.CANCELLED, False] = Unavailable
CODES = {code.value[0]: code for code in Code}  # as the data plane numbers them


def status_of(exc: Exception) -> tuple[grpc.StatusCode, bool]:
    """The code and busy flag a node answers `exc` with: its class's, or its nearest
    base's; INTERNAL for what no one raises on purpose."""
    cls = next((c for c in type(exc).__mro__ if c in STATUSES), None)
    return STATUSES[cls] if cls is not None else (Code.INTERNAL, False)


def error_of(code: grpc.StatusCode, details: str, busy: bool = False) -> KVStoreError:
    """The exception a caller raises for a status, with the node's message."""
    cls = ERRORS.get((code, busy and code is Code.RESOURCE_EXHAUSTED), KVStoreError)
    if cls is InvalidArgument:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument("", details)
    return cls(f"{code.name}: {details}")
