"""One exception hierarchy for the whole project.

One table (kvstore/proto/status.py) maps each class to its gRPC status and back, for
the node and the client alike, so a caller catches the same exception in process and
remotely.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""


class InvalidArgument(KVStoreError, ValueError):
    """A request field is malformed; `field` names it (e.g. `blocks[3].key`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class ResourceExhausted(KVStoreError):
    """No room: a block larger than the tier, or space that did not free up in time."""


class Busy(ResourceExhausted):
    """Short of room, threads or bandwidth for now: the same request may succeed after a
    short backoff, and clients retry it so (a quota or a batch too large is no `Busy`)."""


class NotFound(KVStoreError):
    """A requested entity that must exist does not (misses are not errors)."""


class Unavailable(KVStoreError, ConnectionError):
    """The daemon cannot be reached or went away mid-call."""


class CorruptBlock(KVStoreError):
    """A block's bytes do not match its checksum."""


class Unauthenticated(KVStoreError):
    """A ticket or token that is unknown, used, expired, or presented by another host."""


class PermissionDenied(KVStoreError):
    """The caller is known but may not do this (another user's memory, a read-only token)."""


class OutOfRange(KVStoreError):
    """A position past what is kept (an event sequence no longer retained)."""


class LeaseExpired(KVStoreError):
    """A lease was released or expired: its views may show another block's bytes by now."""


class Unsupported(KVStoreError):
    """The node does not offer what was asked (e.g. it runs no data plane)."""
