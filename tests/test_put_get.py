"""User stories against a real daemon: put, look up, get, compare bytes."""

import numpy as np
import pytest

from conftest import running_daemon
from kvstore.client import Client
from kvstore.errors import InvalidArgument
from kvstore.keys import block_keys

MiB = 1 << 20


def keys_for(salt: bytes, n: int, block_size: int = 16) -> list[bytes]:
    return block_keys(np.arange(n * block_size), block_size, salt)


def test_real_kv_roundtrip_with_prefix_lookup(
    client: Client, salt: bytes, kv_sample: np.ndarray, token_sample: np.ndarray
) -> None:
    block_size = 256
    keys = block_keys(token_sample, block_size, salt)
    blocks = [kv_sample[i * block_size : (i + 1) * block_size] for i in range(len(keys))]
    assert client.put(keys, blocks).stored == 2
    assert client.lookup(keys) == 2
    assert client.lookup_tokens(token_sample, block_size, salt) == 2
    got = client.get(keys)
    for sent, received in zip(blocks, got, strict=True):
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert np.array_equal(received, sent)


@pytest.mark.parametrize("block_size", [16, 256])
def test_block_sizes_of_an_engine_page_and_of_the_default(
    client: Client, salt: bytes, block_size: int
) -> None:
    tokens = np.arange(block_size * 5 + 3)
    keys = block_keys(tokens, block_size, salt)
    payloads = [np.full((block_size, 4), i, np.float16) for i in range(5)]
    client.put(keys, payloads)
    assert client.lookup_tokens(tokens, block_size, salt) == 5
    assert [int(a[0, 0]) for a in client.get(keys)] == list(range(5))


@pytest.mark.parametrize("size", [1, 4095, MiB - 1, MiB + 1, 3 * MiB + 17, 64 * MiB])
def test_any_size_from_one_byte_to_64_mib(
    client: Client, salt: bytes, size: int, rng: np.random.Generator
) -> None:
    payload = rng.integers(0, 256, size, np.uint8).tobytes()
    keys = keys_for(salt, 1)
    assert client.put(keys, [payload]).stored == 1
    [got] = client.get(keys)
    assert got.nbytes == size and got.tobytes() == payload
    client.delete(keys)  # keep the shared daemon's tier for others


def test_many_small_blocks_share_frames(
    client: Client, salt: bytes, rng: np.random.Generator
) -> None:
    keys = keys_for(salt, 3000)
    payloads = [rng.integers(0, 256, int(n), np.uint8) for n in rng.integers(1, 3000, 3000)]
    assert client.put(keys, payloads).stored == 3000
    assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), payloads, strict=True))


def test_put_is_idempotent(client: Client, salt: bytes) -> None:
    keys = keys_for(salt, 3)
    assert client.put(keys[:2], [b"a", b"b"]).stored == 2
    result = client.put(keys, [b"X", b"Y", b"c"])
    assert (result.stored, result.existed) == (1, 2)
    assert [bytes(b) for b in client.get(keys)] == [b"a", b"b", b"c"]  # not overwritten


def test_get_stops_at_the_first_missing_key(client: Client, salt: bytes) -> None:
    keys = keys_for(salt, 5)
    client.put([keys[0], keys[1], keys[3]], [b"0", b"1", b"3"])
    assert client.lookup(keys) == 2
    assert client.lookup_tiers(keys) == ["host", "host"]
    assert [bytes(b) for b in client.get(keys)] == [b"0", b"1"]
    assert client.get(keys[2:]) == []  # a miss is an empty answer, not an error


def test_get_into_a_caller_buffer(client: Client, salt: bytes) -> None:
    keys = keys_for(salt, 3)
    payloads = [np.arange(n, dtype=np.int32) for n in (10, 300_000, 5)]
    client.put(keys, payloads)
    out = np.zeros(2 * MiB, np.uint8)
    got = client.get(keys, out=out)
    assert all(np.array_equal(a, b) for a, b in zip(got, payloads, strict=True))
    assert np.shares_memory(got[1], out)
    assert got[1].flags.writeable
    with pytest.raises(InvalidArgument, match="out"):
        client.get(keys, out=np.zeros(100, np.uint8))


def test_delete_and_stats(daemon, salt: bytes) -> None:
    with daemon.client() as client:
        keys = keys_for(salt, 4)
        client.put(keys, [b"x" * 100] * 4)
        before = client.stats()
        assert client.delete(keys[2:] + keys[2:3]) == 2
        assert client.lookup(keys) == 2
        after = client.stats()
        host = {t.name: t for t in after.tiers}["host"]
        assert host.blocks == {t.name: t for t in before.tiers}["host"].blocks - 2
        assert host.capacity == 512 * MiB
        assert after.lookups > before.lookups
        assert after.uptime_s > 0


def test_checksums_travel_and_verify(daemon, salt: bytes) -> None:
    with daemon.client(checksum=True) as client:
        keys = keys_for(salt, 2)
        client.put(keys, [b"hello", np.arange(1000.0)])
        hello, numbers = client.get(keys)
        assert hello.tobytes() == b"hello" and np.array_equal(numbers, np.arange(1000.0))


def test_non_contiguous_arrays_are_stored_as_their_values(client: Client, salt: bytes) -> None:
    matrix = np.arange(64, dtype=np.float32).reshape(8, 8)
    keys = keys_for(salt, 1)
    client.put(keys, [matrix.T])
    [got] = client.get(keys)
    assert np.array_equal(got, matrix.T)


def test_client_refuses_mismatched_batches(client: Client, salt: bytes) -> None:
    keys = keys_for(salt, 2)
    with pytest.raises(InvalidArgument, match="payloads"):
        client.put(keys, [b"only one"])
    with pytest.raises(InvalidArgument, match=r"keys\[1\]"):
        client.put([keys[0], keys[0]], [b"a", b"b"])


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
def test_the_chosen_path_really_carries_the_bytes(daemon, salt: bytes, transport: str) -> None:
    keys = keys_for(salt, 2)
    with daemon.client(transport=transport) as client:
        before = client.stats().transfers
        client.put(keys, [b"a" * 1000, b"b" * 5])
        assert [bytes(b) for b in client.get(keys)] == [b"a" * 1000, b"b" * 5]
        after = client.stats().transfers
    for direction in ("put", "get"):
        name = f"{direction}/{transport}"
        assert after.get(name, 0) == before.get(name, 0) + 1
    assert sum(after.values()) == sum(before.values()) + 2


def test_auto_prefers_shared_memory_on_the_same_host(daemon, salt: bytes) -> None:
    with daemon.client() as client:
        before = client.stats().transfers.get("put/shm", 0)
        client.put(keys_for(salt, 1), [b"x"])
        assert client.stats().transfers["put/shm"] == before + 1


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_after_a_read_a_prompt_loses_its_last_blocks_first(transport: str) -> None:
    """A read leaves a prompt's first blocks, which later prompts share, the warmest:
    under pressure the prompt gets shorter, it does not lose its head."""
    prompt = block_keys(np.arange(3 * 16), 16, f"lru order/{transport}".encode())
    block = np.full(MiB, 1, np.uint8)
    with (
        running_daemon("--host-capacity", "16MiB") as d,
        d.client(transport=transport, timeout=30) as c,
    ):
        c.put(prompt, [block] * 3)
        assert len(c.get(prompt)) == 3
        filler = block_keys(np.arange(64 * 16), 16, f"filler/{transport}".encode())
        for key in filler:
            c.put([key], [block])
            if (held := c.lookup(prompt)) < 3:
                break
        assert held == 2
