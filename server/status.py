"""Core exceptions become gRPC statuses (the table is kvstore/proto/status.py); and the
node's count of transfers in flight, which refuses those past its bounds."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from kvstore.errors import Busy, KVStoreError, ResourceExhausted, Unavailable
from kvstore.proto.channel import BUSY_TRAILER
from kvstore.proto.frames import FrameError
from kvstore.proto.status import status_of

log = logging.getLogger("kvstore.server")


class TransferCounts:
    """Completed transfers by direction and path ("put/tcp"): which path clients really
    use; and transfers in flight and bytes moved, the load a node reports."""

    def __init__(self, max_bytes: int = 0, max_connection_bytes: int = 0) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.max_bytes = max_bytes  # of transfers in flight over the node; 0: no bound
        self.max_connection_bytes = max_connection_bytes  # the same, per connection
        self.inflight_bytes = 0
        self._by_connection: dict[object, int] = {}
        self.draining = False  # new transfers are refused: the node is stopping
        self.inflight = 0
        self._bytes = 0
        self._bytes_by: dict[str, int] = {}
        self.busy = 0  # requests refused as `Busy` (a retry may pass), on every path
        self._last = (time.monotonic(), 0)
        self._running = _Running(self)  # one for every request: it holds no state of its own

    def add(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            self._bytes_by[name] = self._bytes_by.get(name, 0) + nbytes
            self._bytes += nbytes

    def running(self) -> _Running:
        """A transfer in flight while in its block (refused while the node drains)."""
        return self._running

    @contextmanager
    def holding(self, nbytes: int, connection: object) -> Iterator[None]:
        """`hold` for the block's duration."""
        self.hold(nbytes, connection)
        try:
            yield
        finally:
            self.give(nbytes, connection)

    def hold(self, nbytes: int, connection: object) -> None:
        """`nbytes` of payload in flight on `connection` until `give`: refused when that
        would pass the node's or the connection's bound. A transfer alone passes the node's
        (no block is ever too large to move), not the connection's: that one says "split
        the batch"."""
        if nbytes > 0:  # nothing to hold: an empty batch, a get that found nothing
            with self._lock:
                self._check(nbytes, connection)
                self.inflight_bytes += nbytes
                self._by_connection[connection] = self._by_connection.get(connection, 0) + nbytes

    def give(self, nbytes: int, connection: object) -> None:
        if nbytes > 0:
            with self._lock:
                self.inflight_bytes -= nbytes
                left = self._by_connection.pop(connection) - nbytes
                if left:
                    self._by_connection[connection] = left

    def admit(self, nbytes: int, connection: object) -> None:
        """Refuse a transfer of `nbytes` as `holding` would, but hold nothing (yet): a
        stream that declares much and sends nothing delays no one."""
        if nbytes > 0:
            with self._lock:
                self._check(nbytes, connection)

    def _check(self, nbytes: int, connection: object) -> None:
        mine = self._by_connection.get(connection, 0)
        if self.max_connection_bytes and mine + nbytes > self.max_connection_bytes:
            raise ResourceExhausted(
                f"{mine + nbytes} bytes in flight on one connection, at most "
                f"{self.max_connection_bytes}: split the batch or wait for the others"
            )
        total = self.inflight_bytes
        if self.max_bytes and total and total + nbytes > self.max_bytes:
            raise Busy(
                f"{total} bytes of transfers in flight, at most {self.max_bytes}: retry shortly"
            )

    def refused_busy(self) -> None:
        with self._lock:
            self.busy += 1

    def bytes_by_path(self) -> dict[str, int]:
        """Payload bytes moved, by direction and path ("get/tcp")."""
        with self._lock:
            return dict(self._bytes_by)

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


class _Running:
    """`TransferCounts.running()`: a class, not a generator, since every request enters one."""

    __slots__ = ("counts",)

    def __init__(self, counts: TransferCounts) -> None:
        self.counts = counts

    def __enter__(self) -> None:
        counts = self.counts
        with counts._lock:
            if counts.draining:
                raise Unavailable("the node is shutting down: retry on another node")
            counts.inflight += 1

    def __exit__(self, *exc: object) -> None:
        with self.counts._lock:
            self.counts.inflight -= 1


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    code, busy = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    if busy:  # counted where it was refused (server/policy.py, the servicer's gates)
        context.set_trailing_metadata((BUSY_TRAILER,))
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
