"""Fixtures that start real things: daemons on free loopback ports, temp dirs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import Client

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Daemon:
    address: str
    process: subprocess.Popen

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
        yield Daemon(match.group(1), proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def raw_call(address: str, method: str, request: object) -> bytes:
    """One unary RPC with a hand-built request, past every client-side check."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(f"/kvstore.v1.KVStore/{method}")(request.SerializeToString())


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One shared daemon; tests keep apart by salting their keys uniquely."""
    with running_daemon("--host-capacity", "512MiB") as d:
        yield d
        assert d.process.poll() is None, "the shared daemon died during the tests"


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
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (1 << 32))


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
