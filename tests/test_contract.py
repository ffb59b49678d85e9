"""One contract for every transfer path and every tier kind: the same bytes back, the same
misses and the same exceptions, whichever path moves a block and whichever tier serves it
(README, "Transfer paths": put, get and every error behave the same on all paths). A new
path is one more entry in PATHS, a new tier kind one more in KINDS."""

from __future__ import annotations

import itertools
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import Daemon, running_daemon
from kvstore.client import Client
from kvstore.errors import CorruptBlock, InvalidArgument, Unavailable
from kvstore.fabric import why_not
from kvstore.keys import BlockKey, block_keys
from kvstore.meta import BlockMeta
from kvstore.results import PutResult
from kvstore.tiers.device import device_available

PATHS = ("shm", "nixl", "tcp", "grpc")  # every client path: a new one is one more entry
KINDS = ("device", "host", "disk")  # the tier a node serves its blocks from
MiB = 1 << 20
MAX_BLOCK = 4 * MiB  # every node's --max-block-size
TIMEOUT = 10.0  # every client's: no call here may take longer
FILLERS = itertools.count()  # numbers the filler blocks that push others down to disk


@dataclass
class Node:
    """A daemon whose blocks are served from the tier `kind`."""

    kind: str
    daemon: Daemon
    disk_dir: Path

    def client(self, path: str) -> Client:
        return self.daemon.client(transport=path, timeout=TIMEOUT)

    def settle(self, client: Client, keys: list[BlockKey]) -> None:
        """Have `keys` served from this node's tier kind, and check that they are. On the
        disk node (a host tier of 2 MiB that writes every block down at once), 3 MiB of
        newer blocks leave no room in DRAM for older ones, and reads are not promoted."""
        if self.kind == "disk":
            for _ in range(3):
                filler = block_keys(np.arange(16), 16, b"filler %d" % next(FILLERS))
                client.put(filler, [np.zeros(MiB, np.uint8)])
        assert client.lookup_tiers(keys) == [self.kind] * len(keys)


@contextmanager
def tier_node(kind: str, directory: Path) -> Iterator[Node]:
    if kind == "device" and not device_available("cuda"):
        pytest.skip("the device tier needs torch with a CUDA device, and this machine has none")
    flags = {
        "device": ("--host-capacity", "64MiB", "--device-capacity", "64MiB", "--device", "cuda"),
        "host": ("--host-capacity", "64MiB"),
        "disk": (
            "--host-capacity", "2MiB", "--disk-dir", str(directory), "--disk-capacity", "128MiB",
            "--segment-size", "1MiB", "--dirty-ratio", "0", "--promote", "false",
        ),
    }[kind]  # fmt: skip
    with running_daemon(*flags, "--max-block-size", "4MiB", "--prefault", "false") as daemon:
        yield Node(kind, daemon, directory)


@pytest.fixture(scope="module", params=KINDS)
def node(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Node]:
    with tier_node(request.param, tmp_path_factory.mktemp(request.param)) as node:
        yield node


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    if request.param == "nixl" and why_not():
        pytest.skip(why_not())
    return request.param


@pytest.fixture
def client(node: Node, path: str) -> Iterator[Client]:
    with node.client(path) as client:
        yield client


@pytest.fixture
def keys(salt: bytes) -> list[BlockKey]:
    return block_keys(np.arange(8 * 16), 16, salt)


def blocks_of_every_size(rng: np.random.Generator) -> list[np.ndarray]:
    """1 B, 4 KiB, 100,003 B (no multiple of 4 KiB) and 1 MiB, of several dtypes and ranks."""
    return [
        rng.integers(0, 256, 1, dtype=np.uint8),
        rng.standard_normal((16, 128)).astype(np.float16),
        rng.integers(0, 256, (100_003,), dtype=np.uint8),
        rng.standard_normal((4, 2, 32, 1024)).astype(np.float32),
    ]


# -- blocks in, blocks out -------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_put_then_get_gives_back_the_same_arrays(node, client, keys, rng, codec: str) -> None:
    payloads = blocks_of_every_size(rng)
    keys = keys[: len(payloads)]
    assert client.put(keys, payloads, codec=codec) == PutResult(len(keys), 0)
    assert client.put(keys, payloads, codec=codec) == PutResult(0, len(keys))
    node.settle(client, keys)
    got = client.get(keys)
    assert [(g.dtype, g.shape) for g in got] == [(p.dtype, p.shape) for p in payloads]
    assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))
    out = np.zeros(sum(p.nbytes for p in payloads) + 1, np.uint8)
    got = client.get(keys, out=out)  # into the caller's memory: the same arrays
    assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))


def test_a_missing_key_ends_the_prefix(node, client, keys) -> None:
    assert client.put([keys[0], keys[1], keys[3]], [b"zero", b"one", b"three"]).stored == 3
    node.settle(client, [keys[0], keys[1], keys[3]])
    assert [bytes(b) for b in client.get(keys[:5])] == [b"zero", b"one"]
    assert client.lookup(keys[:5]) == 2 and client.lookup_tiers(keys[:5]) == [node.kind] * 2
    assert client.get(keys[2:4]) == [] and client.lookup(keys[2:4]) == 0
    assert client.get(keys[5:]) == []  # none of them was ever put


def test_a_deleted_block_is_a_miss(node, client, keys) -> None:
    client.put(keys[:3], [b"a", b"b", b"c"])
    node.settle(client, keys[:3])
    assert client.delete(keys[1:2]) == 1
    assert client.delete(keys[1:2]) == 0
    assert [bytes(b) for b in client.get(keys[:3])] == [b"a"]
    assert client.lookup(keys[:3]) == 1 and client.get(keys[1:3]) == []


# -- bad input ---------------------------------------------------------------------------


def put_declared(client: Client, key: BlockKey, meta: BlockMeta, payload: bytes) -> object:
    """A put whose metadata is the caller's own, unchecked by the client."""
    return client.put_blocks([(key, meta)], [memoryview(payload)])


Case = Callable[[Client, list[BlockKey]], object]
BAD_INPUT: dict[str, tuple[Case, str, str]] = {
    "short key": (lambda c, k: c.put([k[0][:15]], [b"x"]), "keys[0]", "must be 16 bytes"),
    "long key": (lambda c, k: c.get([k[0], k[1] + b"x"]), "keys[1]", "must be 16 bytes"),
    "repeated key": (lambda c, k: c.get([k[0], k[0]]), "keys[1]", "repeats keys[0]"),
    "more keys than payloads": (lambda c, k: c.put(k[:2], [b"x"]), "payloads", "got 1 for 2"),
    "block over the node's limit": (
        lambda c, k: c.put(k[:1], [np.zeros(MAX_BLOCK + 1, np.uint8)]),
        "blocks[0].size",
        f"must be 1..{MAX_BLOCK} bytes",
    ),
    "unknown codec": (
        lambda c, k: put_declared(c, k[0], BlockMeta(1, codec="zip9"), b"x"),
        "blocks[0].codec",
        "unknown codec 'zip9'",
    ),
    "bytes that fail their checksum": (
        lambda c, k: put_declared(c, k[0], BlockMeta(4, checksum=12345), b"abcd"),
        "blocks[0].checksum",
        "does not match its checksum",
    ),
    "fewer bytes than declared": (
        lambda c, k: put_declared(c, k[0], BlockMeta(5), b"abcd"),
        "data",
        "data: 4 bytes follow, the blocks declare 5",
    ),
    "more bytes than declared": (
        lambda c, k: put_declared(c, k[0], BlockMeta(3), b"abcd"),
        "data",
        "data: 4 bytes follow, the blocks declare 3",
    ),
    "fewer bytes than declared, 1 MiB": (
        lambda c, k: put_declared(c, k[0], BlockMeta(MiB), bytes(MiB - 5)),
        "data",
        f"data: {MiB - 5} bytes follow, the blocks declare {MiB}",
    ),
    "more bytes than declared, 1 MiB": (
        lambda c, k: put_declared(c, k[0], BlockMeta(MiB), bytes(MiB + 5)),
        "data",
        f"data: {MiB + 5} bytes follow, the blocks declare {MiB}",
    ),
}


def assert_serving(client: Client, key: BlockKey) -> None:
    assert client.put([key], [b"still serving"]).stored == 1
    assert [bytes(b) for b in client.get([key])] == [b"still serving"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_alike_and_the_node_keeps_serving(
    client, keys, path: str, case: str
) -> None:
    call, field, words = BAD_INPUT[case]
    with pytest.raises(InvalidArgument, match=re.escape(words) or None) as refused:
        call(client, keys)
    assert refused.value.field == field
    assert client.lookup(keys[:2]) == 0  # nothing of it was kept
    assert_serving(client, keys[2])


def test_metadata_its_bytes_cannot_fill_is_refused_on_get(node, client, keys) -> None:
    """The node keeps a block whatever its dtype and shape say (it never reads them); the
    get refuses one whose bytes they cannot fill, rather than return garbage."""
    put_declared(client, keys[0], BlockMeta(4, "float16", (3,)), b"abcd")
    node.settle(client, keys[:1])
    with pytest.raises(InvalidArgument, match=f"block {keys[0].hex()}: float16") as refused:
        client.get(keys[:1])
    assert refused.value.field == "shape"
    assert_serving(client, keys[2])


# -- damaged bytes -----------------------------------------------------------------------


def damage(node: Node, keys: list[BlockKey], payload: np.ndarray) -> None:
    """Flip one byte of the block where this node serves it from: in the host arena, as
    any process of the daemon's user can through the shared mapping; in its segment file,
    as a failing disk would."""
    if node.kind == "host":
        with node.client("shm") as shm, shm.lease(keys) as lease:
            at = lease.blocks[0].ctypes.data - shm.shared_arena().ctypes.data
            shm.shared_arena()[at + 1000] ^= 0xFF
        return
    marker = payload[:4096].tobytes()
    for segment in sorted(node.disk_dir.glob("seg-*.kvs"), key=lambda s: -s.stat().st_mtime):
        if (at := segment.read_bytes().find(marker)) >= 0:
            with open(segment, "r+b") as f:
                f.seek(at + 1000)
                byte = f.read(1)[0]
                f.seek(at + 1000)
                f.write(bytes([byte ^ 0xFF]))
            return
    raise AssertionError("the block is in no segment file")


def test_a_damaged_block_is_never_served_as_good(node, client, keys, rng) -> None:
    """README: a block that fails its checksum raises CorruptBlock on every path (host
    arena); a payload corrupted on disk is dropped, counted and never served (a miss)."""
    if node.kind == "device":
        pytest.skip("nothing outside the daemon can damage a block in its GPU memory")
    payloads = [rng.integers(0, 256, 64 << 10, dtype=np.uint8) for _ in range(2)]
    client.put(keys[:2], payloads)
    node.settle(client, keys[:2])
    errors = client.stats().tiers[-1].errors
    damage(node, keys[1:2], payloads[1])
    if node.kind == "host":
        with pytest.raises(CorruptBlock, match=f"block {keys[1].hex()}"):
            client.get(keys[:2])
    else:
        got = client.get(keys[:2])
        assert len(got) == 1 and np.array_equal(got[0], payloads[0])
        assert client.lookup(keys[:2]) == 1
        disk = client.stats().tiers[-1]
        assert disk.errors == errors + 1 and "checksum" in disk.last_error
    assert np.array_equal(client.get(keys[:1])[0], payloads[0])  # the rest is served


# -- a cut connection --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_get_cut_by_the_node_dying_raises_unavailable(
    kind: str, path: str, salt: bytes, tmp_path: Path
) -> None:
    """The node dies after a get has received its present blocks, while it waits for the
    next key: the caller gets Unavailable, never a short prefix taken for a miss, and
    within the client's timeout."""
    keys = block_keys(np.arange(5 * 16), 16, salt)
    out = np.zeros(5 * MiB, np.uint8)
    # the pool is left last: closing the client ends a call that hangs
    with (
        ThreadPoolExecutor(1) as pool,
        tier_node(kind, tmp_path) as node,
        node.client(path) as client,
    ):
        client.put(keys[:4], [np.full(MiB, 0xA5, np.uint8)] * 4)
        node.settle(client, keys[:4])
        get = pool.submit(client.get, keys, out=out, wait=TIMEOUT / 2)
        until(lambda: out[4 * MiB - 1] == 0xA5 or get.done())  # the present blocks came
        assert not get.done()  # and it waits for the fifth
        node.daemon.process.send_signal(signal.SIGKILL)
        with pytest.raises(Unavailable):
            get.result(timeout=TIMEOUT)


def until(condition: Callable[[], bool]) -> None:
    """Ask `condition` again until it holds, at most for a client's timeout."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "not met within the client's timeout"
        time.sleep(0.005)
