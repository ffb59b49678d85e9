"""The one place core exceptions become gRPC statuses."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from kvstore.errors import (
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from kvstore.proto.frames import FrameError

log = logging.getLogger("kvstore.server")

STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FrameError: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    CorruptBlock: grpc.StatusCode.DATA_LOSS,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}


class TransferCounts:
    """Completed transfers by direction and path ("put/tcp"): which path clients really use."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def status_of(exc: Exception) -> grpc.StatusCode:
    return next(
        (code for cls, code in STATUS.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL
    )


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    context.abort(code, str(exc) or type(exc).__name__)


def unary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map core exceptions raised by a unary-response handler to statuses."""

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except (KVStoreError, FrameError) as exc:
            _abort(context, exc)

    return handler


def streaming(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """The same for a handler that yields its replies."""

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except (KVStoreError, FrameError) as exc:
            _abort(context, exc)

    return handler
