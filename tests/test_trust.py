"""Trust, tried as an attacker would: a tenant with a valid token, someone with write
access to the cluster's Redis, a process listening where a node may push. Nodes prove
who they are with the cluster's secret, tenants cannot reach each other's blocks, and
Redis is a hint."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from test_cluster import node
from test_cluster_index import RedisServer, poll

from conftest import (
    CLUSTER_SECRET,
    SERVICE,
    Daemon,
    hello_reply,
    running_daemon,
    secret_file,
    serving,
)
from kvstore.cluster.layout import Layout
from kvstore.cluster.registry import trusted
from kvstore.errors import KVStoreError, PermissionDenied, Unauthenticated
from kvstore.fabric import why_not
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import hello_frame
from kvstore.router import Router
from kvstore.trust import ClusterSecret

needs_redis = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
MiB = 1 << 20
KEYSPACE_SECRET = "the-node-side-secret-of-the-trust-tests-0123"
TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789",
    "pusher": "pusher-token-0123456789",
    "ops": "ops-token-0123456789",
}


def auth_text(secret: str = KEYSPACE_SECRET, **extra: str) -> str:
    rights = {"alice": "shm = true\n", "pusher": "push = true\n", "ops": "admin = true\n"}
    rights |= extra
    tenants = "".join(
        f'[[tenant]]\nname = "{name}"\ntoken = "{token}"\n{rights.get(name, "")}\n'
        for name, token in TOKENS.items()
    )
    return f'secret = "{secret}"\n\n{tenants}'


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(auth_text())
    return path


def keys_for(salt: bytes, n: int) -> list[bytes]:
    return block_keys(np.arange(n * 16), 16, salt)


@contextmanager
def listener() -> Iterator[tuple[str, list]]:
    """A gRPC server that answers every call with UNIMPLEMENTED and keeps what each call
    carried (method, metadata): what a tenant listening on a pushable address learns."""
    seen: list[tuple[str, dict]] = []

    class Record(grpc.GenericRpcHandler):
        def service(self, details):
            seen.append((details.method, dict(details.invocation_metadata)))
            return None

    with serving(Record()) as address:
        yield address, seen


@contextmanager
def relay(target: str) -> Iterator[tuple[str, list]]:
    """A gRPC server that forwards every Hello to a real node `target`, untouched (metadata
    and all), and answers with the node's answer: a man in the middle of a push."""
    seen: list[dict] = []

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = tuple(context.invocation_metadata())
        seen.append(dict(metadata))
        try:
            return forward(request, metadata=metadata)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    handlers = {"Hello": grpc.unary_unary_rpc_method_handler(hello)}
    with (
        grpc.insecure_channel(target) as channel,
        serving(grpc.method_handlers_generic_handler(SERVICE, handlers)) as address,
    ):
        forward = channel.unary_unary(f"/{SERVICE}/Hello")
        yield address, seen


# -- 1. nodes prove who they are; pushing is a right ------------------------------------


def test_a_push_sends_no_credential_to_a_target_that_does_not_prove_itself(auth_file) -> None:
    flags = ("--auth-file", str(auth_file), "--push-allow", "127.0.0.1", "--host-capacity", "8MiB")
    keys = keys_for(b"bait", 2)
    with (
        running_daemon(*flags) as d,
        listener() as (trap, seen),
        d.client(token=TOKENS["pusher"]) as pusher,
    ):
        pusher.put(keys, [b"a", b"b"])
        for transport in ("tcp", "grpc"):
            with pytest.raises(PermissionDenied, match="did not prove it is a node"):
                pusher.push(keys, trap, transport)
    assert seen, "the node never called the target"
    for method, metadata in seen:
        assert method == f"/{SERVICE}/Hello"  # its challenge, and nothing else
        assert "authorization" not in metadata
        assert not any(t in repr(metadata) for t in TOKENS.values())


def test_pushing_is_a_right_a_tenant_is_given(auth_file) -> None:
    flags = ("--auth-file", str(auth_file), "--push-allow", "127.0.0.1", "--host-capacity", "8MiB")
    keys = keys_for(b"rights", 1)
    with running_daemon(*flags) as d, running_daemon("--host-capacity", "8MiB") as target:
        with d.client(token=TOKENS["alice"]) as alice:
            alice.put(keys, [b"hers"])
            with pytest.raises(PermissionDenied, match="'alice' may not push"):
                alice.push(keys, target.address)
        with d.client(token=TOKENS["pusher"]) as pusher:
            pusher.put(keys, [b"its"])
            assert pusher.push(keys, target.address).stored == 1


def test_without_a_cluster_a_node_pushes_nowhere_unless_allowed() -> None:
    keys = keys_for(b"default allow", 1)
    with running_daemon() as src, running_daemon() as dst, src.client() as c:
        c.put(keys, [b"x"])
        with pytest.raises(PermissionDenied, match="neither a node of this cluster nor in"):
            c.push(keys, dst.address)  # loopback is no longer allowed by default
    none = {"KVSTORE_CLUSTER_SECRET": ""}
    with (
        running_daemon("--push-allow", "127.0.0.1", env=none) as src,
        running_daemon() as dst,
        src.client() as c,
    ):
        c.put(keys, [b"x"])
        with pytest.raises(PermissionDenied, match="no --cluster-secret"):
            c.push(keys, dst.address)


def test_nodes_of_another_cluster_are_pushed_nothing() -> None:
    keys = keys_for(b"other cluster", 1)
    other = {"KVSTORE_CLUSTER_SECRET": secret_file()}
    with (
        running_daemon("--push-allow", "127.0.0.1") as src,
        running_daemon(env=other) as stranger,
        src.client() as c,
    ):
        c.put(keys, [b"x"])
        with pytest.raises(PermissionDenied, match="did not prove it is a node"):
            c.push(keys, stranger.address)
        with stranger.client() as s:
            assert s.lookup(keys) == 0


def test_threads_meeting_a_node_at_once_each_get_their_own_proof() -> None:
    """Two fetches of one node's client dial a peer at the same moment: each challenge is
    answered and checked on its own (one must not overwrite the other's)."""
    from kvstore.client.security import NodeCaller

    secret = ClusterSecret.read(CLUSTER_SECRET)
    caller = NodeCaller(secret, "10.0.0.2:7600")
    asked = [caller.challenge() for _ in range(2)]  # both sent before either is answered
    proofs = [secret.prove(c, dialed, "holder", "run-1") for c, dialed in asked]
    for (challenge, _), proof in zip(asked, proofs, strict=True):
        caller.check(proof, challenge, "holder", "run-1")
    with pytest.raises(PermissionDenied):
        caller.check(proofs[0], asked[1][0], "holder", "run-1")
    assert caller.instance == "run-1"


def test_a_relayed_challenge_proves_nothing() -> None:
    """A process between the pushing node and a real node forwards the challenge: the real
    node proves itself only for its own address, so the relay gets no proof it can use,
    and never a credential."""
    keys = keys_for(b"relay", 1)
    with (
        running_daemon("--push-allow", "127.0.0.1") as src,
        running_daemon() as real,
        relay(real.address) as (middle, seen),
        src.client() as c,
    ):
        c.put(keys, [b"x"])
        with pytest.raises(PermissionDenied, match="did not prove it is a node"):
            c.push(keys, middle)
        assert seen and all("authorization" not in m for m in seen)
        with real.client() as r:
            assert r.lookup(keys) == 0


def test_a_node_credential_works_only_at_the_node_and_run_it_was_made_for() -> None:
    secret = ClusterSecret.read(CLUSTER_SECRET)
    tenants = Path(secret_file()).with_name("tenants.toml")
    tenants.write_text(auth_text())
    with running_daemon() as a, running_daemon("--auth-file", str(tenants)) as b:
        info_a = _prove(a.address, secret)
        with pytest.raises(Unauthenticated, match="node credential not accepted"):
            _stats(b.address, secret.credential(info_a.instance))  # made for a, not b
        info_b = _prove(b.address, secret)
        assert _stats(b.address, secret.credential(info_b.instance)).tenant == "(node)"
        stranger = ClusterSecret([os.urandom(24).hex()])
        with pytest.raises(Unauthenticated):
            _stats(b.address, stranger.credential(info_b.instance))


def _prove(address: str, secret: ClusterSecret) -> pb.NodeInfo:
    from kvstore.client.security import NodeCaller

    caller = NodeCaller(secret, address)
    challenge, dialed = caller.challenge()
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Hello")(
            b"", metadata=(("kvstore-challenge", challenge.hex()), ("kvstore-dialed", dialed))
        )
    info = pb.NodeInfo.FromString(raw)
    caller.check(info.proof, challenge, info.node_id, info.instance)
    return info


def _stats(address: str, credential: str) -> pb.StatsReply:
    with grpc.insecure_channel(address) as channel:
        try:
            raw = channel.unary_unary(f"/{SERVICE}/Stats")(
                b"", metadata=(("authorization", credential),)
            )
        except grpc.RpcError as exc:
            raise Unauthenticated(exc.details()) from None
    return pb.StatsReply.FromString(raw)


# -- 2. tenants cannot reach each other's blocks ----------------------------------------


def test_no_answer_names_a_node_key_and_node_keys_reach_nothing(auth_file) -> None:
    """Bob tries what broke the old key spaces: learn his mapping from an error message,
    then turn alice's node keys (as an admin, events or Redis show them) into requests."""
    keys = keys_for(b"alice's prompt", 3)
    payloads = [np.full(1000, i, np.uint8) for i in range(3)]
    hex_key = re.compile(r"[0-9a-f]{32}")
    with running_daemon("--auth-file", str(auth_file), "--host-capacity", "16MiB") as d:
        with d.client(token=TOKENS["alice"]) as alice:
            alice.put(keys, payloads)
        with d.client(token=TOKENS["ops"]) as ops:  # the raw key space: what events list
            node_keys: list[bytes] = []
            for batch in ops.watch(0):
                node_keys += [k for e in batch.events for k in _hashes(e)]
                if len(node_keys) >= 3:
                    break
        assert len(node_keys) == 3 and not set(node_keys) & set(keys)
        repeated = pb.PutRequest(
            headers=pb.BlockHeaders(
                blocks=[pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=1))] * 2
            )
        )  # past the client's own checks: the node's answer is what a tenant learns from
        with grpc.insecure_channel(d.address) as channel, pytest.raises(grpc.RpcError) as err:
            channel.stream_unary(f"/{SERVICE}/Put")(
                iter([repeated.SerializeToString()]),
                metadata=(("authorization", f"Bearer {TOKENS['bob']}"),),
            )
        assert "repeats an earlier key" in err.value.details()
        assert not hex_key.search(err.value.details())
        for transport in ("tcp", "grpc", *(() if why_not() else ("nixl",))):
            with d.client(token=TOKENS["bob"], transport=transport, shm=False) as bob:
                assert bob.get(node_keys) == [] and bob.get(keys) == []
                assert bob.lookup(node_keys) == 0 and bob.delete(node_keys) == 0
                assert bob.locate(node_keys) == [] and bob.locate(keys) == []
        for transport in ("shm", "tcp", "grpc"):
            with d.client(token=TOKENS["alice"], transport=transport) as alice:
                assert alice.get(node_keys) == []  # her node keys are not hers to name
                got = alice.get(keys)
                assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))
                assert [x.matched for x in alice.locate(keys)] == [3]
        with d.client(token=TOKENS["ops"]) as ops:
            assert len(ops.get(node_keys)) == 3  # they are the node's keys indeed


def _hashes(event: object) -> list[bytes]:
    return [h for h in getattr(event, "block_hashes", []) if isinstance(h, bytes)]


def test_a_changed_key_space_secret_serves_old_blocks_to_nobody(auth_file) -> None:
    """Rotating the auth file's `secret` (SIGHUP) gives every tenant a new, empty key space:
    the old blocks are lost to their tenant, and reach no one else."""
    keys = keys_for(b"before rotation", 2)
    with running_daemon("--auth-file", str(auth_file), "--host-capacity", "16MiB") as d:
        with d.client(token=TOKENS["alice"]) as alice:
            alice.put(keys, [b"old", b"blocks"])
        auth_file.write_text(auth_text(secret="a-new-node-side-secret-0123456789abcdef"))
        d.process.send_signal(signal.SIGHUP)
        _wait_log(d, "auth file")
        for name in ("alice", "bob"):
            with d.client(token=TOKENS[name]) as tenant:
                assert tenant.lookup(keys) == 0
        with d.client(token=TOKENS["ops"]) as ops:
            assert ops.stats().tiers[0].blocks == 2  # still there, unreachable, evicted in time


def _wait_log(d: Daemon, what: str) -> str:
    for line in d.process.stderr:
        if what in line:
            return line
    raise AssertionError(f"the daemon ended without logging {what!r}")


def test_a_read_only_tenant_cannot_have_shared_memory(tmp_path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(auth_text(bob="read_only = true\nshm = true\n"))
    with (
        pytest.raises(RuntimeError, match="read_only and shm together") as failed,
        running_daemon("--auth-file", str(path)),
    ):
        pass
    assert "tenant[1]" in str(failed.value)


# -- 4. a revoked tenant loses its data plane ------------------------------------------


def test_a_reload_ends_the_connections_and_tickets_of_a_removed_tenant(auth_file) -> None:
    with running_daemon("--auth-file", str(auth_file), "--host-capacity", "16MiB") as d:
        sockets, tickets = [], []
        for _ in range(2):
            info = _hello(d.address, TOKENS["bob"])
            tickets.append(info)
        sock = _open(tickets[0], TOKENS["bob"])
        sockets.append(sock)
        with d.client(token=TOKENS["alice"], transport="tcp") as alice:
            alice.put(keys_for(b"alice stays", 1), [b"x"])
            auth_file.write_text(auth_text().replace('name = "bob"', 'name = "robert"'))
            d.process.send_signal(signal.SIGHUP)
            _wait_log(d, "auth file")
            assert sock.recv(1) == b""  # bob's open connection: closed by the node
            sock.close()
            status, message = _try_open(tickets[1], TOKENS["bob"])  # his unused ticket
            assert status != 0 and "ticket unknown" in message
            assert alice.lookup(keys_for(b"alice stays", 1)) == 1  # others carry on


def _hello(address: str, token: str) -> pb.NodeInfo:
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Hello")(
            b"", metadata=(("authorization", f"Bearer {token}"),)
        )
    return pb.NodeInfo.FromString(raw)


def _try_open(info: pb.NodeInfo, token: str) -> tuple[int, str]:
    host, _, port = info.data_address.rpartition(":")
    with socket.create_connection((host, int(port)), 30) as sock:
        sock.sendall(hello_frame(info.ticket, token))
        return hello_reply(sock)


def _open(info: pb.NodeInfo, token: str) -> socket.socket:
    host, _, port = info.data_address.rpartition(":")
    sock = socket.create_connection((host, int(port)), 30)
    sock.sendall(hello_frame(info.ticket, token))
    status, message = hello_reply(sock)
    assert status == 0, message
    return sock


# -- 3. Redis is a hint -------------------------------------------------------------------


@needs_redis
def test_a_holder_written_into_redis_is_neither_located_nor_fetched_from(tmp_path) -> None:
    """Someone with write access to Redis registers a fake node holding a prompt: no router,
    no Locate believes it, and a fetch never calls it."""
    keys = keys_for(b"forged holder", 2)
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        layout = Layout()
        with listener() as (fake, seen), node(redis_server.url, "reader") as reader:
            r = redis.Redis(port=redis_server.port)
            slot = 9999
            record = {
                "id": "fake",
                "inc": 1,
                "tok": "x",
                "addr": fake,
                "data": fake,
                "load": "[0,0]",
            }
            forged = ClusterSecret([os.urandom(24).hex()])  # any secret but the cluster's
            expires = int(time.time()) + 600
            sig = forged.mac(b"node-record", "fake", 1, slot, fake, fake, expires).hex()
            record |= {"exp": expires, "sig": sig}
            r.hset(layout.node(slot), mapping=record)
            r.hset(layout.ids, "fake", slot)
            for key in keys:
                r.set(layout.block(key), (slot * 4 + 1).to_bytes(4, "big"))
            with Router(redis_server.url, secret=CLUSTER_SECRET) as router:
                assert router.locate(keys) == [] and "fake" not in {
                    n.node_id for n in router.nodes()
                }
            with reader.client() as c:
                assert c.locate(keys) == []
                assert c.get(keys, fetch=True) == []
            r.close()
        assert seen == []  # not one call reached it
    finally:
        redis_server.stop()


def test_a_signature_holds_for_its_slot_incarnation_and_time_only() -> None:
    secret = ClusterSecret.read(CLUSTER_SECRET)
    expires = str(int(time.time()) + 60).encode()
    fields = (b"a", b"3", b"127.0.0.1:1", b"127.0.0.1:2")
    purpose = b"node-record"
    sig = secret.mac(purpose, fields[0], fields[1], b"7", fields[2], fields[3], expires).hex()

    def check(slot: bytes, inc: bytes, exp: bytes) -> bool:
        return trusted(secret, slot, fields[0], inc, fields[2], fields[3], exp, sig.encode())

    assert check(b"7", b"3", expires)
    assert not check(b"8", b"3", expires)  # copied into another slot
    assert not check(b"7", b"4", expires)  # replayed into a later incarnation
    assert not check(b"7", b"3", str(int(time.time()) - 1).encode())  # expired
    assert not trusted(secret, b"7", fields[0], b"3", fields[2], fields[3], expires, b"zz")


def test_a_fetch_lands_only_the_keys_it_asked_for_within_the_sizes_it_takes() -> None:
    from kvstore.server.fetch import _Landing
    from kvstore.store import Store
    from kvstore.tiers.host import HostTier

    store = Store([HostTier(16 * MiB, prefault=False)], max_block_size=MiB, reserve_timeout=1)
    try:
        asked = keys_for(b"asked", 2)
        other = keys_for(b"not asked", 1)
        for blocks in (
            [(other[0], BlockMeta(size=10))],  # a key nobody asked for
            [(asked[1], BlockMeta(size=10))],  # out of order
            [(asked[0], BlockMeta(size=2 * MiB))],  # larger than the node takes
        ):
            landing = _Landing(store, asked, lambda size: None)
            with pytest.raises(KVStoreError):
                landing.place(blocks)
            assert store.stats().tiers[0].blocks == 0
    finally:
        store.close()


@needs_redis
def test_nodes_and_routers_reach_redis_with_acl_users_and_tls(tmp_path) -> None:
    """The roles the README gives nodes and routers are enough, and TLS to Redis works."""
    pki = _pki(tmp_path)
    port = _free_port()
    users = (
        "--user", "default", "off",
        "--user", "kvnode", "on", ">node-password-0123", "~kv:*", "~{kv:}*", "+@all",
        "-@dangerous", "+info",
        "--user", "kvrouter", "on", ">router-password-0123", "~kv:*", "~{kv:}*", "+@read",
        "+@scripting", "+@connection", "+set", "+del", "-@dangerous",
    )  # fmt: skip
    tls = (
        "--tls-port", str(port), "--port", "0", "--tls-cert-file", str(pki["cert"]),
        "--tls-key-file", str(pki["key"]), "--tls-ca-cert-file", str(pki["ca"]),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    server = RedisServer(tmp_path / "redis", *users, *tls, port=port)
    server.url = f"rediss://kvnode:node-password-0123@127.0.0.1:{port}/0"
    ca = f"?ssl_ca_certs={pki['ca']}"
    try:
        _start_tls_redis(server, pki)
        keys = keys_for(b"over tls", 2)
        with ExitStack() as stack:
            a = stack.enter_context(node(server.url + ca, "a"))
            with a.client() as c:
                c.put(keys, [b"a", b"b"])
            router_url = f"rediss://kvrouter:router-password-0123@127.0.0.1:{port}/0{ca}"
            with Router(router_url, secret=CLUSTER_SECRET) as router:
                poll(lambda: [(x.node_id, x.matched) for x in router.locate(keys)] == [("a", 2)])
            wrong = f"rediss://kvnode:wrong-password@127.0.0.1:{port}/0{ca}"
            b = stack.enter_context(node(wrong, "b"))
            with b.client() as c:
                assert c.locate(keys) == [] and "unreachable" in c.local_only
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pki(tmp_path: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1 it signed, made as test_tls makes them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from test_tls import _cert, _key_pem

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("redis test CA", ca_key, None, ca_key, ca=True)
    pem = serialization.Encoding.PEM
    files = {
        "ca": ca.public_bytes(pem),
        "cert": _cert("redis", key, ca, ca_key).public_bytes(pem),
        "key": _key_pem(key),
    }
    paths = {name: tmp_path / f"redis-{name}.pem" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    return paths


def _start_tls_redis(server: RedisServer, pki: dict[str, Path]) -> None:
    """RedisServer.start pings over plain TCP; this one speaks TLS only."""
    import subprocess

    server.workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(server.workdir), *server.flags]  # fmt: skip
    server.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    client = redis.Redis(
        port=server.port, ssl=True, ssl_ca_certs=str(pki["ca"]),
        username="kvnode", password="node-password-0123",
    )  # fmt: skip

    def pings() -> bool:
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    poll(pings, timeout=10)
    client.close()


# -- 9. secrets rotate without losing the cache ----------------------------------------


def test_the_cluster_secret_rotates_with_sighup_and_nodes_keep_talking(tmp_path) -> None:
    """Step by step as the README says: add the new secret second everywhere, move it first
    everywhere, drop the old: pushes work at every step, and blocks stay."""
    old, new = os.urandom(24).hex(), os.urandom(24).hex()
    file_a, file_b = tmp_path / "a.secret", tmp_path / "b.secret"
    file_a.write_text(old + "\n")
    file_b.write_text(old + "\n")
    keys = keys_for(b"rotation", 4)
    with (
        running_daemon("--push-allow", "127.0.0.1", env={"KVSTORE_CLUSTER_SECRET": str(file_a)})
        as a,
        running_daemon(env={"KVSTORE_CLUSTER_SECRET": str(file_b)}) as b,
        a.client() as c,
    ):  # fmt: skip
        c.put(keys, [b"0", b"1", b"2", b"3"])
        steps = [(f"{old}\n{new}\n", f"{old}\n{new}\n"), (f"{new}\n{old}\n", f"{new}\n{old}\n"),
                 (f"{new}\n", f"{new}\n")]  # fmt: skip
        for i, (text_a, text_b) in enumerate(steps):
            for path, text, d in ((file_a, text_a, a), (file_b, text_b, b)):
                path.write_text(text)
                d.process.send_signal(signal.SIGHUP)
                _wait_log(d, "cluster secret")
            assert c.push(keys[i : i + 1], b.address).stored == 1
        with b.client() as receiver:
            assert receiver.lookup(keys[:3]) == 3
        assert c.lookup(keys) == 4  # the cache outlived every step
        file_b.write_text(old + "\n")  # one node left behind on the old secret alone
        b.process.send_signal(signal.SIGHUP)
        _wait_log(b, "cluster secret")
        with pytest.raises(PermissionDenied, match="did not prove"):
            c.push(keys[3:], b.address)


def test_a_cluster_needs_its_secret_to_start(tmp_path) -> None:
    with (
        pytest.raises(RuntimeError, match="cluster_secret: required with --cluster") as failed,
        running_daemon("--cluster", "redis://127.0.0.1:1/0", env={"KVSTORE_CLUSTER_SECRET": ""}),
    ):
        pass
    short = tmp_path / "short.secret"
    short.write_text("too short\n")
    with (
        pytest.raises(RuntimeError, match="shorter than 32 characters"),
        running_daemon(env={"KVSTORE_CLUSTER_SECRET": str(short)}),
    ):
        pass
    assert "did not start" in str(failed.value)
