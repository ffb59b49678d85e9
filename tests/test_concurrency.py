"""Many clients at once, sync and async, with checksums over random payloads."""

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstore.client import AsyncClient, Client
from kvstore.keys import block_keys


def batch(seed: int, n: int) -> tuple[list[bytes], list[np.ndarray], list[bytes]]:
    rng = np.random.default_rng(seed)
    keys = block_keys(rng.integers(0, 50_000, n * 16), 16, b"concurrency-%d" % seed)
    payloads = [rng.integers(0, 256, int(size), np.uint8) for size in rng.integers(1, 600_000, n)]
    return keys, payloads, [hashlib.sha256(p).digest() for p in payloads]


def roundtrip_sync(address: str, seed: int) -> int:
    keys, payloads, digests = batch(seed, 12)
    with Client(address, chunk_size=256 << 10) as client:
        for _ in range(3):
            client.put(keys, payloads)
            got = client.get(keys)
            assert [hashlib.sha256(g).digest() for g in got] == digests
    return len(keys)


async def roundtrip_async(client: AsyncClient, seed: int) -> int:
    keys, payloads, digests = batch(seed, 12)
    for _ in range(3):
        await client.put(keys, payloads)
        got = await client.get(keys)
        assert [hashlib.sha256(g).digest() for g in got] == digests
    return len(keys)


def test_sync_and_async_clients_at_once(daemon) -> None:
    async def async_side() -> list[int]:
        async with AsyncClient(daemon.address) as client:
            return await asyncio.gather(*(roundtrip_async(client, 100 + s) for s in range(6)))

    with ThreadPoolExecutor(8) as pool:
        sync_side = [pool.submit(roundtrip_sync, daemon.address, s) for s in range(8)]
        async_counts = asyncio.run(async_side())
        sync_counts = [f.result(timeout=120) for f in sync_side]
    assert sum(sync_counts) + sum(async_counts) == 14 * 12


def test_same_keys_from_many_writers_store_once(daemon) -> None:
    keys, payloads, digests = batch(999, 8)

    def put(_: int) -> tuple[int, int]:
        with Client(daemon.address) as client:
            result = client.put(keys, payloads)
            return result.stored, result.existed

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(put, range(6)))
    assert sum(stored for stored, _ in results) == 8  # each block stored exactly once
    assert all(stored + existed == 8 for stored, existed in results)
    with Client(daemon.address) as client:
        assert [hashlib.sha256(g).digest() for g in client.get(keys)] == digests
