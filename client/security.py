"""How a client proves who it is and checks whom it talks to: a tenant's token (sent as
gRPC metadata, proven on the data plane without being sent), or for a node calling
another node the cluster's secret (the peer proves it first); and TLS for gRPC and the
TCP data plane. Shared memory needs neither: it never leaves the host."""

from __future__ import annotations

import functools
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore.errors import InvalidArgument, PermissionDenied
from kvstore.trust import ClusterSecret


class NodeCaller:
    """A node calling another: the peer first proves the cluster's secret for the address
    dialed (`challenge`, `check`), then every call carries a credential bound to the
    instance that proved it, so nothing is sent to a peer that did not prove itself. Each
    proof answers its own challenge: threads meeting the peer at once each ask one."""

    def __init__(self, cluster: ClusterSecret, dialed: str) -> None:
        self.cluster = cluster
        self.dialed = dialed
        self.instance = ""  # the peer's, once proven

    def challenge(self) -> tuple[bytes, str]:
        return os.urandom(16), self.dialed

    def check(self, proof: bytes, challenge: bytes, node_id: str, instance: str) -> None:
        if not self.cluster.proven(proof, challenge, self.dialed, node_id, instance):
            raise PermissionDenied(f"{self.dialed} did not prove it is a node of this cluster")
        self.instance = instance


@dataclass(frozen=True)
class Security:
    token: str = ""  # the tenant's; "" where the node runs without an auth file
    tls_ca: str = ""  # PEM file of the CA the node's certificate must chain to; set: TLS
    tls_cert: str = ""  # PEM file of this client's certificate (mutual TLS), with tls_key
    tls_key: str = ""
    node: NodeCaller | None = None  # set: a node calling a node, with the cluster's secret

    @classmethod
    def of(
        cls,
        token: str | None,
        tls_ca: str,
        tls_cert: str,
        tls_key: str,
        node: NodeCaller | None = None,
    ) -> Security:
        if bool(tls_cert) != bool(tls_key):
            raise InvalidArgument("tls_cert", "tls_cert and tls_key go together")
        if tls_cert and not tls_ca:
            raise InvalidArgument("tls_ca", "a client certificate needs TLS: set tls_ca too")
        if node is not None:
            token = node.cluster.data_token()
        token = os.environ.get("KVSTORE_TOKEN", "") if token is None else token
        return cls(token, tls_ca, tls_cert, tls_key, node)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.node is not None:
            if not self.node.instance:  # the client proves its peer before any other call
                raise PermissionDenied(f"{self.node.dialed} has not proven itself yet")
            return (("authorization", self.node.cluster.credential(self.node.instance)),)
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.Channel:
        if not self.tls_ca:
            return grpc.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "tls_ca"),
            private_key=_read(self.tls_key, "tls_key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "tls_cert") if self.tls_cert else None,
        )
        return grpc.secure_channel(address, credentials, options=options)

    def wrap(self, sock: socket.socket, host: str) -> socket.socket:
        """A connected data-plane socket, over TLS when the client talks TLS."""
        context = self._context()
        if context is None:
            return sock
        return context.wrap_socket(sock, server_hostname=host)

    @functools.cache  # noqa: B019 (one per Security, which lives as long as its client)
    def _context(self) -> ssl.SSLContext | None:
        if not self.tls_ca:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(field, f"cannot read {path}: {exc.strerror}") from None
