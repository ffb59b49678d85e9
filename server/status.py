"""The one place core exceptions become gRPC statuses."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from kvstore.errors import (
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
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}


class TransferCounts:
    """Completed transfers by direction and path ("put/tcp"): which path clients really
    use; and transfers in flight and bytes moved, the load a node reports."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.inflight = 0
        self._bytes = 0
        self._last = (time.monotonic(), 0)

    def add(self, name: str, nbytes: int = 0) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            self._bytes += nbytes

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self.inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self.inflight -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def load(self) -> tuple[int, float]:
        """Transfers in flight now, and bytes per second since the last call."""
        with self._lock:
            now, moved = time.monotonic(), self._bytes
            then, before = self._last
            self._last = (now, moved)
            inflight = self.inflight
        return inflight, (moved - before) / (now - then) if now > then else 0.0


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
