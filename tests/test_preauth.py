"""Before authentication: a call without a known token is refused before its request is
read, and no request may be larger than the largest a legitimate caller sends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SERVICE, Daemon, running_daemon
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.server.auth import Auth
from kvstore.server.main import MAX_CHUNK, MAX_RECEIVE
from kvstore.server.preauth import token_check
from kvstore.store import Store
from kvstore.tiers.host import HostTier
from kvstore.trust import ClusterSecret

MiB = 1 << 20
TOKEN = "alice-token-0123456789"
AUTH = f"""
secret = "a-secret-of-at-least-32-characters-0123456789"

[[tenant]]
name = "alice"
token = "{TOKEN}"
"""


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preauth") / "tenants.toml"
    path.write_text(AUTH)
    return path


@pytest.fixture(scope="module")
def node(auth_file: Path) -> Iterator[Daemon]:
    with running_daemon("--host-capacity", "16MiB", "--auth-file", str(auth_file)) as d:
        yield d


def lookup(address: str, size: int, authorization: str | None) -> grpc.RpcError | None:
    """A Lookup of `size` bytes (a salt that long: valid protobuf), raw: its error."""
    request = pb.LookupRequest(tokens=pb.TokenPrefix(block_size=16, salt=bytes(size)))
    raw = request.SerializeToString()
    metadata = (("authorization", authorization),) if authorization else None
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(f"/{SERVICE}/Lookup")(raw, timeout=60, metadata=metadata)
        except grpc.RpcError as exc:
            return exc
    return None


def rss(pid: int) -> int:
    """Resident bytes of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [(None, "no token"), ("Bearer not-a-token-of-anyone", "token unknown")],
)
def test_a_large_call_without_a_known_token_is_refused(node, authorization, reason) -> None:
    error = lookup(node.address, 32 * MiB, authorization)
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason in error.details()


def test_unauthenticated_requests_are_never_read(node) -> None:
    """8 callers at once, 48 MiB each, no known token: the node holds none of it (it
    read them all before it checked the token, and kept over 1 GiB)."""
    before = rss(node.process.pid)
    tokens = [None, "Bearer not-a-token-of-anyone"] * 4
    with futures.ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(lambda t: lookup(node.address, 48 * MiB, t), tokens))
    assert {e.code() if e else None for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    assert rss(node.process.pid) - before < 100 * MiB


def test_no_request_may_be_larger_than_a_data_frame(node) -> None:
    error = lookup(node.address, MAX_RECEIVE, f"Bearer {TOKEN}")
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = lookup(node.address, 5 * MiB, f"Bearer {TOKEN}")  # read, then refused by name
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "salt" in error.details()


def test_health_and_reflection_need_no_token(node) -> None:
    with grpc.insecure_channel(node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_gate_reads_credentials_as_the_handlers_do(auth_file: Path) -> None:
    store = Store([HostTier(4 * MiB, prefault=False)], max_block_size=MiB, reserve_timeout=1)
    cluster = ClusterSecret([os.urandom(24).hex()])
    try:
        check = token_check(Auth(str(auth_file), store, cluster, "instance").caller)
        assert check([("authorization", f"Bearer {TOKEN}")]) is None
        assert check([("authorization", TOKEN)]) is None
        assert check([("authorization", cluster.credential("instance"))]) is None  # a node's
        assert "not accepted" in check([("authorization", cluster.credential("another run"))])
        assert "not accepted" in check([("authorization", "Node anything")])
        assert "no token" in check([("x-other", "value")])
        assert "token unknown" in check([("authorization", "Bearer nobody-0123456789")])
        assert token_check(Auth("", store).caller)([]) is None  # no auth file: open
    finally:
        store.close()


def test_a_256_mib_block_goes_over_grpc_in_the_largest_chunks(auth_file: Path) -> None:
    flags = ("--host-capacity", "320MiB", "--prefault", "false", "--auth-file", str(auth_file))
    payload = np.arange(256 * MiB // 8, dtype=np.uint64).view(np.uint8)
    keys = block_keys(np.arange(16), 16, b"big")
    with (
        running_daemon(*flags) as d,
        d.client(token=TOKEN, transport="grpc", chunk_size=MAX_CHUNK, timeout=120) as client,
    ):
        assert client.put(keys, [payload]).stored == 1
        (got,) = client.get(keys)
        assert np.array_equal(np.frombuffer(got, np.uint8), payload)
