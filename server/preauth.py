"""Refuse a call without a known token before its request is read.

gRPC's sync server runs interceptors with a call's method and metadata only; a unary
handler then receives the whole request message (up to the receive limit) in a worker
thread before the servicer sees the token. So a caller without a token could make the
node hold that much memory per call. This interceptor answers UNAUTHENTICATED first.

The refusal is served by a handler that takes a request *stream*, whatever the method's
kind: a unary-request handler would still receive the message before it could abort,
while a stream's requests are read only when iterated, and this one never iterates.
On the wire a unary call is a stream of one message, so the client cannot tell. The
reply's kind (one reply or a stream) stays the method's own.

A node's first Hello carries a challenge and no credential (kvstore/trust.py): it is
answered from its metadata alone, its request never read.

The servicer still checks every token itself; this is only the cheap gate before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from kvstore.errors import Unauthenticated
from kvstore.trust import CHALLENGE

Metadata = Sequence[tuple[str, str | bytes]]
Check = Callable[[Metadata], str | None]  # why a call is refused, or None: let it in
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
HELLO = "/kvstore.v1.KVStore/Hello"


def token_check(caller: Callable[[Metadata], object]) -> Check:
    """What the node would say of a call's credential (`caller`: server/auth.py
    `Auth.caller`, which follows SIGHUP reloads): the reason to refuse it, or None. A
    node's credential is checked as fully as a tenant's token."""

    def refusal(metadata: Metadata) -> str | None:
        try:
            caller(metadata)
        except Unauthenticated as exc:
            return str(exc)
        return None

    return refusal


class PreAuth(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED, reading no request, when `check` refuses a call's
    metadata; health and reflection stay open."""

    def __init__(self, check: Check) -> None:
        self._check = check

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        metadata = details.invocation_metadata or ()
        if details.method == HELLO and any(key == CHALLENGE for key, _ in metadata):
            return _unread(handler)  # a node's challenge: answered from its metadata alone
        reason = self._check(metadata)
        if reason is None:
            return handler
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_refused_stream(reason))
        return grpc.stream_unary_rpc_method_handler(_refused(reason))


def _unread(handler: Any) -> Any:
    """A unary handler run without its request being read (it gets b"")."""
    return grpc.stream_unary_rpc_method_handler(
        lambda requests, context: handler.unary_unary(b"", context)
    )


def _refused(reason: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)  # `requests` never read

    return refuse


def _refused_stream(reason: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # a generator, as a streaming handler's behaviour is

    return refuse
