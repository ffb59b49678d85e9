"""Tenants: a token per tenant, a namespace per tenant, quotas, read-only tokens, shared
memory only where granted; nodes call each other with an admin token."""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_cluster_index import RedisServer, poll
from test_fetch import node

from conftest import NIXL, SERVICE, Daemon, hello_reply, running_daemon
from kvstore.client import Client
from kvstore.errors import PermissionDenied, ResourceExhausted, Unauthenticated, Unsupported
from kvstore.fabric import why_not
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import hello_frame

MiB = 1 << 20
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
SECRET = 'secret = "the-node-side-secret-of-this-suite-0123456789"\n'
AUTH = f"""{SECRET}
[[tenant]]
name = "alice"
token = "{TOKENS["alice"]}"
shm = true

[[tenant]]
name = "bob"
token = "{TOKENS["bob"]}"
push = true

[[tenant]]
name = "reader"
token = "reader-token-0123456789"
read_only = true

[[tenant]]
name = "small"
token = "small-token-0123456789"
quota = "4MiB"

[[tenant]]
name = "ops"
token = "ops-token-0123456789"
admin = true
"""


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tenants.toml"
    path.write_text(AUTH)
    return path


@pytest.fixture(scope="module")
def node_with_tenants(auth_file: Path) -> Iterator[Daemon]:
    flags = ("--host-capacity", "64MiB", "--auth-file", str(auth_file), "--push-allow", "127.0.0.1")
    with running_daemon(*flags) as d:
        yield d


def as_tenant(d: Daemon, name: str, **kw) -> Client:
    tokens = {**TOKENS, "reader": "reader-token-0123456789", "small": "small-token-0123456789"}
    return d.client(token=tokens.get(name, "ops-token-0123456789"), timeout=30, **kw)


def raw_hello(d: Daemon, name: str) -> pb.NodeInfo:
    """What Hello tells `name`, ticket included (a client keeps its tickets to itself)."""
    token = TOKENS[name]
    with grpc.insecure_channel(d.address) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Hello")(
            pb.HelloRequest().SerializeToString(), metadata=(("authorization", f"Bearer {token}"),)
        )
    return pb.NodeInfo.FromString(raw)


def call(address: str, method: str, request: object, token: str | None, timeout: float = 10):
    """One RPC, raw, with `token` (or none): the error it ended with, or None."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    raw, path = request.SerializeToString(), f"/{SERVICE}/{method}"
    with grpc.insecure_channel(address) as channel:
        try:
            if method == "Put":
                channel.stream_unary(path)(iter([raw]), timeout=timeout, metadata=metadata)
            elif method in ("Get", "Watch"):
                next(iter(channel.unary_stream(path)(raw, timeout=timeout, metadata=metadata)), 0)
            else:
                channel.unary_unary(path)(raw, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            return exc
    return None


KEY = bytes(16)
REQUESTS = {
    "Hello": pb.HelloRequest(),
    "Stats": pb.StatsRequest(),
    "Lookup": pb.LookupRequest(keys=pb.GetRequest(keys=[KEY])),
    "Get": pb.GetRequest(keys=[KEY]),
    "Put": pb.PutRequest(headers=pb.BlockHeaders()),
    "Delete": pb.DeleteRequest(keys=[KEY]),
    "Locate": pb.LookupRequest(keys=pb.GetRequest(keys=[KEY])),
    "Prefetch": pb.GetRequest(keys=[KEY]),
    "Push": pb.PushRequest(keys=[KEY], target="127.0.0.1:1"),
    "Watch": pb.WatchRequest(),
}


@pytest.mark.parametrize("token", [None, "not-a-token-of-anyone"])
@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_every_rpc_wants_a_known_token(node_with_tenants, method: str, token) -> None:
    error = call(node_with_tenants.address, method, REQUESTS[method], token)
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("no token" if token is None else "token unknown") in error.details()


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm", pytest.param("nixl", marks=NIXL)])
def test_no_tenant_can_reach_another_tenants_blocks(node_with_tenants, transport: str) -> None:
    """Bob asks for exactly Alice's keys, on every path: he finds, reads, deletes and
    overwrites nothing of hers; his own put of those keys is his alone."""
    keys = block_keys(np.arange(4 * 16), 16, f"shared prompt/{transport}".encode())
    hers = [np.full(MiB, i, np.uint8) for i in range(4)]
    his = [np.full(MiB, 100 + i, np.uint8) for i in range(4)]
    bob_transport = "tcp" if transport == "shm" else transport  # bob may not map memory
    with (
        as_tenant(node_with_tenants, "alice", transport=transport) as alice,
        as_tenant(node_with_tenants, "bob", transport=bob_transport) as bob,
    ):
        assert alice.put(keys, hers).stored == 4
        assert bob.lookup(keys) == 0
        assert bob.get(keys) == []
        assert bob.prefetch(keys) == 0
        assert bob.delete(keys) == 0
        assert bob.push(keys, "127.0.0.1:1").found == 0  # nothing of his to push anywhere
        assert [loc.matched for loc in bob.locate(keys) if loc.matched] == []
        assert bob.put(keys, his).stored == 4  # not "existed": his namespace is empty
        assert all(np.array_equal(g, p) for g, p in zip(bob.get(keys), his, strict=True))
        assert all(np.array_equal(g, p) for g, p in zip(alice.get(keys), hers, strict=True))
        assert alice.lookup(keys) == 4 and [loc.matched for loc in alice.locate(keys)] == [4]
        assert bob.delete(keys) == 4 and alice.lookup(keys) == 4


def test_stats_show_a_tenant_its_own_usage_only(node_with_tenants) -> None:
    keys = block_keys(np.arange(2 * 16), 16, b"stats")
    with (
        as_tenant(node_with_tenants, "small") as small,
        as_tenant(node_with_tenants, "bob") as bob,
        as_tenant(node_with_tenants, "ops") as ops,
    ):
        small.put(keys, [np.zeros(MiB, np.uint8)] * 2)
        bob.put(keys, [np.zeros(1000, np.uint8)] * 2)
        mine = small.stats()
        assert (mine.tenant, mine.tenant_blocks, mine.quota) == ("small", 2, 4 * MiB)
        assert mine.tenant_bytes == 2 * MiB
        assert all(t.blocks == 0 and t.bytes == 0 and t.capacity for t in mine.tiers)
        assert not mine.transfers and mine.puts == 0  # nothing of the node's traffic
        node = ops.stats()  # an admin sees the node
        assert node.tiers[0].blocks >= 4 and node.puts >= 4


def test_a_tenant_over_quota_evicts_its_own_coldest_blocks_only(auth_file) -> None:
    keys = block_keys(np.arange(8 * 16), 16, b"quota")
    others = block_keys(np.arange(2 * 16), 16, b"quota/bob")
    with (
        running_daemon("--host-capacity", "64MiB", "--auth-file", str(auth_file)) as d,
        as_tenant(d, "small", transport="tcp") as small,  # a quota of 4 MiB
        as_tenant(d, "bob") as bob,
    ):
        bob.put(others, [np.ones(MiB, np.uint8)] * 2)  # bob's: older than all of small's
        for i in range(4):
            small.put(keys[i : i + 1], [np.full(MiB, i, np.uint8)])
        small.get(keys[0:1])  # read: the warmest of the four now
        small.put(keys[4:6], [np.full(MiB, 4, np.uint8)] * 2)  # two past the quota
        assert [small.lookup(keys[i : i + 1]) for i in range(6)] == [1, 0, 0, 1, 1, 1]
        assert small.stats().tenant_bytes == 4 * MiB
        assert bob.lookup(others) == 2  # never another's
        with pytest.raises(ResourceExhausted, match="quota"):
            small.put(keys[6:8], [np.zeros(3 * MiB, np.uint8)] * 2)  # could never fit
        assert small.lookup(keys[:1]) == 1  # and refused before it dropped anything


@pytest.mark.parametrize("transport", ["grpc", "tcp", pytest.param("nixl", marks=NIXL)])
def test_a_read_only_token_reads_but_never_writes(node_with_tenants, transport: str) -> None:
    keys = block_keys(np.arange(16), 16, f"read only/{transport}".encode())
    with as_tenant(node_with_tenants, "reader", transport=transport) as reader:
        assert reader.get(keys) == [] and reader.lookup(keys) == 0
        with pytest.raises(PermissionDenied, match="read-only"):
            reader.put(keys, [b"x"])
        with pytest.raises(PermissionDenied, match="read-only"):
            reader.delete(keys)


def test_shared_memory_only_for_tenants_allowed_it(node_with_tenants) -> None:
    with as_tenant(node_with_tenants, "alice") as alice, as_tenant(node_with_tenants, "bob") as bob:
        assert alice.node_info().unix_address and not bob.node_info().unix_address
        bob.put(block_keys(np.arange(16), 16, b"shm"), [b"x"])
        assert bob.path == ("tcp" if why_not() else "nixl")  # auto: the best bob may take
        with pytest.raises(Unsupported, match="no shared memory"):  # nor by asking for it
            as_tenant(node_with_tenants, "bob", transport="shm").get([bytes(16)])
        unix = alice.node_info().unix_address  # bob, on alice's socket, with his own ticket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect("\0" + unix)
            sock.sendall(hello_frame(raw_hello(node_with_tenants, "bob").ticket, TOKENS["bob"]))
            status, message = hello_reply(sock)
        assert status == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "may not map" in message


def data_hello(d: Daemon, ticket: bytes, token: str) -> tuple[int, str]:
    host, _, port = as_tenant(d, "bob").node_info().data_address.rpartition(":")
    with socket.create_connection((host, int(port)), 10) as sock:
        sock.sendall(hello_frame(ticket, token))
        return hello_reply(sock)


def test_a_ticket_serves_only_its_token_and_only_once(node_with_tenants) -> None:
    ticket = raw_hello(node_with_tenants, "alice").ticket
    status, message = data_hello(node_with_tenants, ticket, TOKENS["bob"])
    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "another token" in message
    ticket = raw_hello(node_with_tenants, "alice").ticket
    assert data_hello(node_with_tenants, ticket, TOKENS["alice"])[0] == 0
    status, message = data_hello(node_with_tenants, ticket, TOKENS["alice"])  # replayed
    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0] and "already used" in message


def test_watch_is_for_admins(node_with_tenants) -> None:
    with as_tenant(node_with_tenants, "bob") as bob, pytest.raises(PermissionDenied):
        next(iter(bob.watch()))
    ops = "ops-token-0123456789"
    error = call(node_with_tenants.address, "Watch", pb.WatchRequest(), ops, timeout=1)
    assert error is None or error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # no events yet


def test_the_token_comes_from_the_environment_too(node_with_tenants, monkeypatch) -> None:
    monkeypatch.setenv("KVSTORE_TOKEN", TOKENS["bob"])
    with Client(node_with_tenants.address, timeout=10) as bob:
        assert bob.stats().tenant == "bob"


def test_sighup_reloads_the_tenants_and_a_broken_file_changes_nothing(tmp_path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(AUTH)
    carol_entry = '[[tenant]]\nname = "carol"\ntoken = "carol-token-0123456789"\n'
    with (
        running_daemon("--auth-file", str(path), "--host-capacity", "16MiB") as d,
        d.client(token="carol-token-0123456789", timeout=10) as carol,
    ):
        with pytest.raises(Unauthenticated):
            carol.stats()
        path.write_text(AUTH + carol_entry)
        d.process.send_signal(signal.SIGHUP)
        assert "reloaded: 6 tenants" in _next_log_line(d)
        assert carol.stats().tenant == "carol"
        path.write_text(SECRET + "[[tenant]]\nname = 'x'\nnonsense = 1\n")  # a typo: refused
        d.process.send_signal(signal.SIGHUP)
        assert "tenant[0].nonsense: unknown key" in _next_log_line(d)
        assert carol.stats().tenant == "carol"  # the tenants stay as they were
        path.write_text(AUTH)  # fixed, without carol
        d.process.send_signal(signal.SIGHUP)
        assert "reloaded: 5 tenants" in _next_log_line(d)
        with pytest.raises(Unauthenticated):
            carol.stats()


def _next_log_line(d: Daemon) -> str:
    """The daemon's next line about its auth file: it logs every reload, done or refused."""
    for line in d.process.stderr:
        if "auth file" in line:
            return line
    raise AssertionError("the daemon ended without logging the reload")


@pytest.mark.parametrize(
    "text, message",
    [
        (SECRET + "[[tenant]]\nname = 'a'\ntoken = 'short'\n", "tenant[0].token: at least 16"),
        (SECRET + "[[tenant]]\nname = 'a'\ntoken = '0123456789abcdef'\nquota = 'lots'\n", "quota"),
        (
            SECRET + "[[tenant]]\nname = 'a'\ntoken = '0123456789abcdef'\nreadonly = true\n",
            "readonly",
        ),
        (SECRET + "[tenant]\nname = 'a'\n", "no [[tenant]] tables"),
        (
            SECRET + "[[tenant]]\nname = 'a'\ntoken = '0123456789abcdef'\n" * 2,
            "tenant[1].name: repeated",
        ),
        ("[[tenant]]\nname = 'a'\ntoken = '0123456789abcdef'\n", "secret: a string of at least 32"),
        ("secret = 'short'\n[[tenant]]\nname = 'a'\ntoken = '0123456789abcdef'\n", "secret: a str"),
        (
            SECRET
            + "[[tenant]]\nname = 'a'\ntoken = '0123456789abcdef'\nread_only = true\nshm = true\n",
            "tenant[0]: read_only and shm together",
        ),
    ],
)
def test_a_bad_auth_file_stops_the_node_at_start_naming_the_key(tmp_path, text, message) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    with (
        pytest.raises(RuntimeError, match="did not start") as failed,
        running_daemon("--auth-file", str(path)),
    ):
        pass
    assert message in str(failed.value)


def test_binding_every_interface_without_auth_warns(tmp_path) -> None:
    with (
        running_daemon("--address", "0.0.0.0:0", "--host-capacity", "8MiB") as d,
        d.client(timeout=10) as c,
    ):
        c.stats()
        d.process.send_signal(signal.SIGTERM)
        d.process.wait(timeout=30)
        assert "without --auth-file" in d.process.stderr.read()


@pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
def test_nodes_fetch_for_a_tenant_with_the_admin_token(auth_file, tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    keys = block_keys(np.arange(3 * 16), 16, b"fetched for alice")
    payloads = [np.full(MiB, 7 + i, np.uint8) for i in range(3)]
    try:
        with ExitStack() as stack:
            a = stack.enter_context(node(redis.url, "a", "--auth-file", str(auth_file)))
            b = stack.enter_context(node(redis.url, "b", "--auth-file", str(auth_file)))
            with as_tenant(a, "alice") as alice_a:
                alice_a.put(keys, payloads)
            with as_tenant(b, "alice") as alice_b, as_tenant(b, "bob") as bob_b:
                poll(
                    lambda: [(x.node_id, x.matched) for x in alice_b.locate(keys)][:1] == [("a", 3)]
                )
                assert bob_b.get(keys, fetch=True) == []  # bob's namespace: nothing anywhere
                got = alice_b.get(keys, fetch=True)
                assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))
                assert alice_b.lookup(keys) == 3
    finally:
        redis.stop()
