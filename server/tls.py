"""TLS for the node's gRPC port and TCP data plane (`--tls-cert`, `--tls-key`, and
`--tls-client-ca` for mutual TLS), and how the node itself calls other nodes."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TypedDict

import grpc

from kvstore.config import ServerConfig
from kvstore.trust import ClusterSecret


class PeerOptions(TypedDict, total=False):
    """`kvstore.client.Client` options for this node's calls to other nodes."""

    tls_ca: str
    tls_cert: str
    tls_key: str
    cluster_secret: ClusterSecret | None


def grpc_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def data_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The data plane's server side; None: plain TCP."""
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_options(config: ServerConfig) -> PeerOptions:
    """Client options for this node's calls to others (fetch, push), besides the cluster's
    secret: with TLS this node's certificate, trusting the client CA (else its own
    certificate, one shared by every node, as its CA)."""
    if not config.tls_cert:
        return {}
    return {
        "tls_ca": config.tls_client_ca or config.tls_cert,
        "tls_cert": config.tls_cert,
        "tls_key": config.tls_key,
    }
