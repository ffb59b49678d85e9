"""TLS: gRPC and the TCP data plane encrypted (`--tls-cert`, `--tls-key`), mutual TLS with
`--tls-client-ca`, nodes calling each other over TLS; shared memory as before."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import NIXL, SERVICE, Daemon, running_daemon
from kvstore.client import Client
from kvstore.errors import Unavailable
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import HELLO_MAGIC, hello_frame

MiB = 1 << 20


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    root = tmp_path_factory.mktemp("pki")
    files: dict[str, bytes] = {}
    for prefix in ("", "other_"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(f"{prefix}kvstore test CA", ca_key, None, ca_key, ca=True)
        files[f"{prefix}ca"] = ca.public_bytes(serialization.Encoding.PEM)
        if prefix:
            break
        for who in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            files[f"{who}_cert"] = _cert(who, key, ca, ca_key).public_bytes(
                serialization.Encoding.PEM
            )
            files[f"{who}_key"] = _key_pem(key)
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    return Pki(**paths)


@pytest.fixture(scope="module")
def tls_node(pki: Pki) -> Iterator[Daemon]:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with running_daemon("--host-capacity", "64MiB", *flags) as d:
        yield d


@pytest.fixture(scope="module")
def mtls_node(pki: Pki) -> Iterator[Daemon]:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with running_daemon("--host-capacity", "64MiB", *flags, "--tls-client-ca", str(pki.ca)) as d:
        yield d


def round_trip(client: Client, name: str) -> None:
    keys = block_keys(np.arange(3 * 16), 16, name.encode())
    blocks = [np.random.default_rng(i).integers(0, 256, MiB, np.uint8) for i in range(3)]
    assert client.put(keys, blocks).stored == 3
    got = client.get(keys)
    assert [bytes(g) for g in got] == [b.tobytes() for b in blocks]


@pytest.mark.parametrize("transport", ["grpc", "tcp", "auto"])
def test_blocks_round_trip_over_tls(tls_node, pki, transport: str) -> None:
    with Client(tls_node.address, transport=transport, tls_ca=str(pki.ca), timeout=30) as c:
        round_trip(c, f"tls/{transport}")
        # auto: shared memory still, it never leaves the host
        assert c.path == {"grpc": "grpc", "tcp": "tcp", "auto": "shm"}[transport]


@NIXL
def test_nixl_is_off_under_tls_unless_the_operator_turns_it_on(tls_node, pki) -> None:
    """NIXL traffic is not encrypted: `--nixl auto` leaves it off on a TLS node; `on`
    serves it (a trusted fabric), beside TLS on gRPC and the data plane's socket."""
    assert "with NIXL" not in tls_node.banner
    with Client(tls_node.address, shm=False, tls_ca=str(pki.ca), timeout=30) as c:
        assert c.path == "tcp"
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with running_daemon("--host-capacity", "64MiB", *flags, "--nixl", "on") as d:
        assert "with NIXL" in d.banner
        with Client(d.address, shm=False, tls_ca=str(pki.ca), timeout=30) as c:
            round_trip(c, "tls/nixl on")
            assert c.path == "nixl"


def test_a_plaintext_client_gets_a_clear_error_from_a_tls_node(tls_node) -> None:
    with (
        Client(tls_node.address, transport="grpc", timeout=5) as c,
        pytest.raises(Unavailable, match="TLS"),
    ):
        c.stats()


def test_the_data_plane_refuses_plaintext(tls_node, pki) -> None:
    """A HELLO in the clear is no TLS handshake: the node drops the connection."""
    info = hello_tls(tls_node, pki)
    host, _, port = info.data_address.rpartition(":")
    with socket.create_connection((host, int(port)), 10) as sock:
        sock.sendall(hello_frame(info.ticket))
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # closed, reset, or a TLS alert first
            while chunk := sock.recv(1 << 16):
                answer += chunk
    assert not answer.startswith(HELLO_MAGIC)


def test_a_client_checks_the_node_certificate(tls_node, pki) -> None:
    with (
        Client(tls_node.address, transport="tcp", tls_ca=str(pki.other_ca), timeout=5) as c,
        pytest.raises(Unavailable),
    ):
        c.stats()
    context = ssl.create_default_context(cafile=str(pki.other_ca))
    host, _, port = hello_tls(tls_node, pki).data_address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), 10) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(sock, server_hostname=host)


def hello_tls(d: Daemon, pki: Pki) -> pb.NodeInfo:
    """Hello over TLS, raw: the ticket a client keeps to itself included."""
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(d.address, credentials) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Hello")(pb.HelloRequest().SerializeToString())
    return pb.NodeInfo.FromString(raw)


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_mutual_tls_needs_a_client_certificate(mtls_node, pki, transport: str) -> None:
    with (
        Client(mtls_node.address, transport=transport, tls_ca=str(pki.ca), timeout=5) as c,
        pytest.raises(Unavailable),
    ):
        c.stats()
    options = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert)}
    with Client(
        mtls_node.address, transport=transport, tls_key=str(pki.client_key), timeout=30, **options
    ) as c:
        round_trip(c, f"mtls/{transport}")
        assert c.path == transport


def test_nodes_push_to_each_other_over_mutual_tls(pki) -> None:
    """A node calls another with its own certificate, trusting the client CA."""
    flags = (
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--tls-client-ca", str(pki.ca), "--host-capacity", "32MiB"),
    )
    options = {
        "tls_ca": str(pki.ca),
        "tls_cert": str(pki.client_cert),
        "tls_key": str(pki.client_key),
    }
    keys = block_keys(np.arange(2 * 16), 16, b"tls push")
    blocks = [np.full(MiB, i + 1, np.uint8) for i in range(2)]
    with (
        running_daemon(*flags) as a,
        running_daemon(*flags, "--push-allow", "127.0.0.1") as b,
        Client(a.address, timeout=30, **options) as to_a,
        Client(b.address, timeout=30, **options) as to_b,
    ):
        to_b.put(keys, blocks)
        assert to_b.push(keys, a.address).stored == 2
        assert [bytes(g) for g in to_a.get(keys)] == [b.tobytes() for b in blocks]


def test_tls_options_are_checked_before_anything_is_sent(pki) -> None:
    with pytest.raises(ValueError, match="tls_key"):
        Client("127.0.0.1:1", tls_ca=str(pki.ca), tls_cert=str(pki.client_cert))
    with pytest.raises(ValueError, match="tls_ca"):
        Client("127.0.0.1:1", tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--tls-cert", "CERT"), "tls_cert, tls_key: give both"),
        (("--tls-client-ca", "CA"), "tls_client_ca: needs tls_cert"),
        (("--tls-cert", "/nonexistent.pem", "--tls-key", "KEY"), "tls_cert: cannot read"),
    ],
)
def test_bad_tls_flags_stop_the_node_naming_the_flag(pki, flags, message) -> None:
    files = {"CERT": str(pki.server_cert), "KEY": str(pki.server_key), "CA": str(pki.ca)}
    with (
        pytest.raises(RuntimeError, match="did not start") as failed,
        running_daemon(*[files.get(f, f) for f in flags]),
    ):
        pass
    assert message in str(failed.value)
