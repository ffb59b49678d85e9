"""Node to node: this node sends blocks to another, as a client of that node's data plane.

A push names its target, so the target is checked before any byte leaves: it must be a
node of the cluster (a signed record) or a host the operator allowed (`--push-allow`:
hosts or networks; none by default); it must prove, for the address dialed, that it
holds the cluster's secret, before it is sent a credential or a byte; it must not be this
node; and the data plane it names must be allowed too. The proof (and a `tcp` or `grpc`
push) shares the caller's deadline, and errors say what failed without echoing what the
target answered.

`auto` pushes over NIXL where both nodes run it (the target READs the blocks straight from
this node's arena, pinned until the put returns), else over the target's TCP data plane,
through the client the fetcher keeps of that node (NIXL's agent and its wire-up cost
~0.2 s: too much for each push), or over gRPC to a target without a data plane; `nixl`
is the kept client on NIXL only; `tcp` and `grpc` take a client of this push alone.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvstore.errors import (
    InvalidArgument,
    KVStoreError,
    PermissionDenied,
    Unavailable,
    Unsupported,
)
from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.results import PutResult

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.server.fetch import Fetcher

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PushPolicy:
    """Which hosts this node may push to."""

    def __init__(self, allow: str) -> None:
        self.networks: list[Network] = []
        self.names: set[str] = set()
        for entry in filter(None, (e.strip() for e in allow.split(","))):
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.lower())

    def check(self, address: str, field: str = "target") -> None:
        """PermissionDenied unless every address `address`'s host resolves to is allowed."""
        host, sep, port = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(field, f"expected HOST:PORT, got {address!r}")
        if host.lower() in self.names:
            return
        try:
            resolved = {str(info[4][0]) for info in socket.getaddrinfo(host, int(port))}
        except OSError:
            raise Unavailable(f"push target {host} does not resolve") from None
        for ip in resolved:
            parsed = ipaddress.ip_address(ip.split("%")[0])
            if not any(parsed in net for net in self.networks if net.version == parsed.version):
                raise PermissionDenied(
                    f"{field}: {host} is neither a node of this cluster nor in --push-allow"
                )


def push(
    allowed: Callable[[str, str], None],
    own_instance: str,
    target: str,
    transport: str,
    blocks: Sequence[tuple[BlockKey, BlockMeta]],
    views: Sequence[memoryview],
    timeout: float | None,
    chunk_size: int,
    peers: Fetcher,
) -> PutResult:
    from kvstore.client import Client  # a node pushing is a client of the other node

    allowed(target, "target")
    with Client(
        target,
        transport="tcp" if transport == "tcp" else "grpc",  # auto and nixl: for the proof
        timeout=timeout,
        chunk_size=chunk_size,
        shm=False,
        **peers.peer_options,
    ) as peer:
        try:
            info = peer.node_info()
        except PermissionDenied:
            raise PermissionDenied(
                f"push to {target}: it did not prove it is a node of this cluster"
            ) from None
        except KVStoreError:
            raise Unavailable(f"push to {target} failed: no kvstore node answers there") from None
        if info.instance == own_instance:
            raise InvalidArgument("target", f"{target} is this node")
        data_host = info.data_address.rpartition(":")[0].strip("[]")
        if transport != "grpc" and data_host not in ("", "0.0.0.0", "::"):  # else: target's
            allowed(info.data_address, "target's data plane")
        alone = transport in ("tcp", "grpc") or (transport == "auto" and not info.data_address)
        try:
            if alone:
                return peer.put_blocks(blocks, views)
            return peers.call(target, lambda kept: _put(kept, transport, blocks, views))
        except Unsupported:
            raise Unavailable(f"push to {target}: NIXL is not on at both nodes") from None
        except KVStoreError as exc:
            raise Unavailable(f"push to {target} failed: {type(exc).__name__}") from None


def _put(
    client: Client,
    transport: str,
    blocks: Sequence[tuple[BlockKey, BlockMeta]],
    views: Sequence[memoryview],
) -> PutResult:
    if transport == "nixl" and client.path != "nixl":
        raise Unsupported("NIXL is not on at both nodes")
    return client.put_blocks(blocks, views)
