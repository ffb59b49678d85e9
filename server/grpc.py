"""The gRPC path's node half: a Put stream of header frames then data frames copied once
into reserved slots, a Get stream answered from pinned slots, a Lookup. The path that
always works, wherever the client is."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import grpc
import numpy as np

from kvstore.config import MIN_RATE
from kvstore.errors import InvalidArgument
from kvstore.keys import block_keys, check_keys
from kvstore.limits import MAX_BLOCKS, MAX_HEADER_FRAME, MAX_SALT, MAX_TOKENS
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import data_frames, decode_frame, parse
from kvstore.server.policy import Ask, Caller, RequestPolicy
from kvstore.tenants import Tenant

HEADERS_TAG = b"\x0a"  # field 1 (headers), length-delimited: a frame of block headers

log = logging.getLogger("kvstore.server")


class GrpcPath:
    def __init__(
        self, policy: RequestPolicy, chunk_size: int, timeout: float, min_rate: float = MIN_RATE
    ) -> None:
        self.policy = policy
        self.chunk_size = chunk_size
        # a put stream's bounds, the data plane's: --data-timeout and --min-rate
        self.timeout = timeout
        self.min_rate = min_rate
        self._deadlines = _Watchdog()

    def put(self, frames: Iterator[bytes], context: grpc.ServicerContext, tenant: Tenant) -> bytes:
        with (
            self.policy.put(_caller(context, tenant)) as put,
            self._deadlines.watch(context, self.timeout, self.min_rate) as deadline,
        ):
            for raw in deadline.frames(frames):
                if raw[:1] == HEADERS_TAG and len(raw) > MAX_HEADER_FRAME:
                    raise InvalidArgument(
                        "headers", f"a frame of {len(raw)} bytes: at most {MAX_HEADER_FRAME}"
                    )
                frame = decode_frame(raw, pb.PutRequest)
                if not isinstance(frame, memoryview):
                    if frame.HasField("headers"):  # the first one says whether it is durable
                        blocks = headers_from_proto(frame.headers.blocks)
                        put.declare(blocks, frame.headers.durable)
                        deadline.declared += sum(meta.size for _, meta in blocks)
                        continue
                    if not frame.HasField("data"):
                        raise InvalidArgument("frame", "PutRequest sets neither headers nor data")
                    frame = memoryview(frame.data)
                put.feed(frame)
            result = put.finish()
        return pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()

    def get(self, raw: bytes, context: grpc.ServicerContext, tenant: Tenant) -> Iterator[bytes]:
        request = parse(raw, pb.GetRequest)
        ask = Ask(request.keys, request.wait_ms, request.fetch, _answer_by(context))
        with self.policy.get(_caller(context, tenant), ask) as found:
            headers = pb.BlockHeaders(
                blocks=headers_to_proto(found.headers), truncated=found.truncated
            )
            yield pb.GetReply(headers=headers).SerializeToString()
            # pinned to the end, released together (last first: see ReadBatch.close)
            for frame, _ in data_frames(found.views, self.chunk_size):
                yield frame

    def lookup(
        self,
        raw: bytes,
        context: grpc.ServicerContext,
        tenant: Tenant,
        gate: Callable[[], AbstractContextManager[object]],
    ) -> bytes:
        """A lookup that may block (`fetch`, or `wait` for a first key not here) does so in
        `gate`, the bound on RPC threads that may block; a plain one never enters it."""
        request = parse(raw, pb.LookupRequest)
        keys = self.lookup_keys(raw)
        ask = Ask(keys, request.keys.wait_ms, request.keys.fetch, _answer_by(context))
        tiers = self.policy.lookup(_caller(context, tenant), ask, gate)
        return pb.LookupReply(found=len(tiers), tiers=tiers).SerializeToString()

    @staticmethod
    def lookup_keys(raw: bytes) -> list[bytes]:
        """The keys a LookupRequest names, or that its tokens hash to."""
        request = parse(raw, pb.LookupRequest)
        if request.HasField("tokens"):
            return token_keys(request.tokens)
        if request.HasField("keys"):
            return check_keys(request.keys.keys, "keys.keys")
        raise InvalidArgument("query", "LookupRequest sets neither keys nor tokens")


class _Deadline:
    """A put stream's deadline, the data plane's: it may stall (the node waiting on the
    client) for `timeout`, and must be done by `timeout` plus its bytes at `min_rate`."""

    def __init__(self, context: grpc.ServicerContext, timeout: float, min_rate: float) -> None:
        self.context = context
        self.timeout = timeout
        self.min_rate = min_rate
        self.start = self.waiting_since = time.monotonic()
        self.declared = 0  # bytes

    def due(self) -> float:
        overall = self.start + self.timeout + self.declared / self.min_rate
        return min(self.waiting_since + self.timeout, overall)

    def frames(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        """`frames`, each checked against the deadline as it comes. The node's own time
        between them (waiting for room) is no stall of the client's."""
        for raw in frames:
            self.waiting_since = math.inf
            if time.monotonic() > self.due():  # a trickle: it ends here, on its own thread
                self.context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"put too slow: {self.declared} bytes get {self.timeout} s plus "
                    f"{self.min_rate:.0f} bytes/s (--data-timeout, --min-rate)",
                )
            yield raw
            self.waiting_since = time.monotonic()
        self.start = self.waiting_since = math.inf  # all came: what is left is the node's


class _Watchdog:
    """Ends put streams past their deadline. gRPC never times a stream out on the node's
    side, and a handler waiting in the request iterator looks at no clock; so one thread
    cancels the calls that are late (`RpcContext.cancel`, callable from any thread): their
    iterator raises, the handler unwinds, and what the put reserved is freed."""

    def __init__(self) -> None:
        self._deadlines: set[_Deadline] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(
        self, context: grpc.ServicerContext, timeout: float, min_rate: float
    ) -> Iterator[_Deadline]:
        deadline = _Deadline(context, timeout, min_rate)
        with self._changed:
            self._deadlines.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kvstore-put-deadlines", daemon=True
                )
                self._thread.start()
            self._changed.notify()
        try:
            yield deadline
        finally:
            with self._changed:
                self._deadlines.discard(deadline)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                late = {d for d in self._deadlines if d.due() <= now}
                self._deadlines -= late
                if not late:  # a deadline may come nearer (a stall begins): look again soon
                    soonest = min((d.due() for d in self._deadlines), default=math.inf)
                    self._changed.wait(None if soonest == math.inf else min(soonest - now, 0.5))
                    continue
            for deadline in late:
                log.info(
                    "put from %s ended: stalled past --data-timeout, or too slow for --min-rate",
                    deadline.context.peer(),
                )
                deadline.context.cancel()


def _caller(context: grpc.ServicerContext, tenant: Tenant) -> Caller:
    """A gRPC call's bytes in flight are bounded per peer (its HTTP/2 connection)."""
    return Caller(tenant, "grpc", context.peer(), context.is_active)


def _answer_by(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline (time.monotonic()), if it set one."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


def token_keys(tokens: pb.TokenPrefix) -> list[bytes]:
    """The keys of a prompt the node hashes itself, within the limits of one request."""
    if tokens.block_size < 1:
        raise InvalidArgument("tokens.block_size", "must be >= 1")
    if len(tokens.token_ids) > MAX_TOKENS:
        raise InvalidArgument(
            "tokens.token_ids", f"{len(tokens.token_ids)} tokens: at most {MAX_TOKENS}"
        )
    if len(tokens.salt) > MAX_SALT:
        raise InvalidArgument("tokens.salt", f"{len(tokens.salt)} bytes: at most {MAX_SALT}")
    if len(tokens.token_ids) // tokens.block_size > MAX_BLOCKS:
        raise InvalidArgument(
            "tokens.block_size",
            f"{tokens.block_size} makes more than {MAX_BLOCKS} blocks of the tokens",
        )
    return block_keys(np.asarray(tokens.token_ids, dtype=np.uint32), tokens.block_size, tokens.salt)
