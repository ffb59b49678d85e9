"""Fixtures that start real things: daemons on free loopback ports, temp dirs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvstore.client import Client
from kvstore.fabric import why_not
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    HELLO,
    HELLO_MAGIC,
    HELLO_REPLY,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    Frame,
    encode,
    hello_frame,
    read_frame,
    recv_exact,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NIXL = pytest.mark.skipif(bool(why_not()), reason=why_not() or "NIXL is installed")
SERVICE = "kvstore.v1.KVStore"


def secret_file(secret: str | None = None) -> str:
    """A cluster secret file of its own (random unless given), in a temp dir of its own."""
    path = Path(tempfile.mkdtemp(prefix="kvstore-secret-")) / "cluster.secret"
    path.write_text((secret or os.urandom(24).hex()) + "\n")
    return str(path)


# every daemon's and router's of the suite, the benchmark's children's too (they inherit
# it): one cluster, unless a test says otherwise
CLUSTER_SECRET = os.environ.setdefault("KVSTORE_TEST_CLUSTER_SECRET", secret_file())
os.environ["KVSTORE_CLUSTER_SECRET"] = CLUSTER_SECRET


@dataclass
class Daemon:
    address: str
    process: subprocess.Popen
    banner: str = ""  # the line it printed once serving: its addresses and tiers

    def client(self, **kw) -> Client:
        return Client(self.address, **kw)


@contextmanager
def running_daemon(
    *flags: str, env: dict[str, str] | None = None, **popen: object
) -> Iterator[Daemon]:
    """A `kvstore-server` subprocess on a free port; stopped (and checked) on exit."""
    cmd = [sys.executable, "-m", "kvstore.server", "--address", "127.0.0.1:0", *flags]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )
    line = proc.stdout.readline()  # the daemon prints its address once it serves
    match = re.search(r"listening on (\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"daemon did not start: {line!r} {proc.stderr.read()}")
    try:
        yield Daemon(match.group(1), proc, line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def raw_call(address: str, method: str, request: object) -> bytes:
    """One unary RPC with a hand-built request, past every client-side check."""
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(f"/kvstore.v1.KVStore/{method}")(request.SerializeToString())


def hello(address: str) -> pb.NodeInfo:
    return pb.NodeInfo.FromString(raw_call(address, "Hello", pb.HelloRequest()))


@contextmanager
def raw_channel(address: str, source: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A request-channel connection to a node's TCP data plane, opened by hand (HELLO)."""
    info = hello(address)
    host, _, port = info.data_address.rpartition(":")
    with socket.create_connection((host, int(port)), 30, source_address=(source, 0)) as sock:
        sock.sendall(hello_frame(info.ticket))
        status, message = hello_reply(sock)
        assert status == 0, message
        yield sock


def hello_reply(sock: socket.socket) -> tuple[int, str]:
    head = memoryview(bytearray(HELLO_REPLY.size))
    recv_exact(sock, head)
    _, status, length, _, _ = HELLO_REPLY.unpack(head)
    text = memoryview(bytearray(length))
    recv_exact(sock, text)
    return status, bytes(text).decode()


def send_request(
    sock: socket.socket, op: int, message, *, flags: int = 0, data: bytes = b""
) -> None:
    meta = message.SerializeToString()
    sock.sendall(encode(REQUEST_MAGIC, op, flags, meta, len(data)) + data)


def drip(sock: socket.socket, data: bytes, pause: float) -> int:
    """Send `data` a byte at a time, `pause` seconds apart, until the node closes the
    connection: how many bytes went before it did (len(data): it never did)."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
            if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                return sent
        except BlockingIOError:
            pass
        except OSError:
            return sent
        time.sleep(pause)  # the drip itself
    return len(data)


def read_answer(sock: socket.socket) -> Frame:
    return read_frame(sock, REPLY_MAGIC)


@contextmanager
def serving(handler: grpc.GenericRpcHandler) -> Iterator[str]:
    """A gRPC server on a free loopback port, answering with `handler`: its address."""
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@contextmanager
def fake_node(info: pb.NodeInfo, unix_fd: int | None = None) -> Iterator[str]:
    """Something at a gRPC address that answers `Hello` as a node would, with `info`, and
    (with `unix_fd`) hands that descriptor to whoever opens its Unix socket: what a
    hostile or broken peer could do. Yields its address."""
    unix = None
    info.instance = info.instance or os.urandom(16).hex()
    if unix_fd is not None:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"kvstore-fake-{os.urandom(8).hex()}"
        unix.bind("\0" + name)
        unix.listen(8)
        info.unix_address = name

        def serve_unix() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = unix.accept()
                    conn.recv(HELLO.size)
                    reply = HELLO_REPLY.pack(
                        HELLO_MAGIC, 0, 0, bytes.fromhex(info.instance), 1 << 20
                    )
                    socket.send_fds(conn, [reply], [unix_fd])
                    conn.close()

        threading.Thread(target=serve_unix, daemon=True).start()
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            lambda request, context: info.SerializeToString()
        )
    }
    try:
        with serving(grpc.method_handlers_generic_handler(SERVICE, handlers)) as address:
            yield address
    finally:
        if unix is not None:
            with contextlib.suppress(OSError):
                unix.shutdown(socket.SHUT_RDWR)  # wakes its accept, which holds the name
            unix.close()


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One shared daemon; tests keep apart by salting their keys uniquely. It may push to
    other daemons of the suite on loopback (which prove the suite's cluster secret)."""
    with running_daemon("--host-capacity", "512MiB", "--push-allow", "127.0.0.1") as d:
        yield d
        assert d.process.poll() is None, "the shared daemon died during the tests"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[object]:
    """A `redis-server` of its own, on a free port, for the cluster's tests."""
    from test_cluster_index import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def small_daemon() -> Iterator[Daemon]:
    """A daemon of its own with a 16 MiB host tier, for eviction and capacity stories."""
    with running_daemon("--host-capacity", "16MiB", "--reserve-timeout", "2") as d:
        yield d


@pytest.fixture(params=["tcp", "grpc"])
def client(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client forced onto each transfer path in turn."""
    with daemon.client(transport=request.param) as c:
        yield c


@pytest.fixture
def salt(request: pytest.FixtureRequest) -> bytes:
    """A namespace of the test's own on the shared daemon."""
    return request.node.nodeid.encode()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Seeded per test from its name (a stable digest: `hash()` of a string is not)."""
    seed = int.from_bytes(hashlib.blake2b(request.node.nodeid.encode(), digest_size=8).digest())
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def kv_sample() -> np.ndarray:
    """Real KV (SmolLM2-135M, 512 tokens, fp16): [tokens, layers, 2, heads, dim]."""
    path = DATA / "smollm2_kv_fp16_512tok.npy"
    if not path.exists():
        pytest.skip(f"sample data not found at {path}")
    return np.load(path)


@pytest.fixture(scope="session")
def token_sample() -> np.ndarray:
    path = DATA / "smollm2_tokens_512.npy"
    if not path.exists():
        pytest.skip(f"sample data not found at {path}")
    return np.load(path)
