"""AsyncClient: the same calls as Client, awaitable."""

import numpy as np
import pytest

from kvstore.client import AsyncClient
from kvstore.errors import InvalidArgument, LeaseExpired, Unavailable, Unsupported
from kvstore.keys import block_keys


async def test_async_story(daemon, salt: bytes) -> None:
    tokens = np.arange(16 * 4)
    keys = block_keys(tokens, 16, salt)
    payloads = [np.full((16, 3), i, np.float32) for i in range(4)]
    async with AsyncClient(daemon.address, checksum=True) as client:
        assert (await client.put(keys[:3], payloads[:3])).stored == 3
        assert await client.lookup(keys) == 3
        assert await client.lookup_tiers(keys[:1]) == ["host"]
        assert await client.lookup_tokens(tokens, 16, salt) == 3
        got = await client.get(keys)
        assert len(got) == 3 and all(
            np.array_equal(a, b) for a, b in zip(got, payloads, strict=False)
        )
        out = np.empty(1 << 16, np.uint8)
        got = await client.get(keys, out=out)
        assert np.shares_memory(got[0], out)
        assert await client.delete(keys) == 3
        assert (await client.stats()).tiers[0].name == "host"
        with pytest.raises(InvalidArgument, match=r"keys\[0\]"):
            await client.get([b"short"])


async def test_unreachable_daemon_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.lookup([bytes(16)])


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
async def test_async_transfers_take_the_chosen_path(daemon, salt: bytes, transport: str) -> None:
    keys = block_keys(np.arange(32), 16, salt)
    async with AsyncClient(daemon.address, transport=transport) as client:
        before = (await client.stats()).transfers
        await client.put(keys, [b"x" * 100, b"y"])
        assert [bytes(b) for b in await client.get(keys)] == [b"x" * 100, b"y"]
        after = (await client.stats()).transfers
    for name in (f"put/{transport}", f"get/{transport}"):
        assert after.get(name, 0) == before.get(name, 0) + 1


async def test_async_leases_and_in_place_puts(daemon, salt: bytes) -> None:
    keys = block_keys(np.arange(48), 16, salt)
    blocks = [np.full(1000, i, np.float32) for i in range(3)]

    def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
        for i, slot in zip(indexes, slots, strict=True):
            slot[:] = blocks[i].view(np.uint8)

    async with AsyncClient(daemon.address) as client:
        result = await client.put_in_place(keys, np.float32, (1000,), fill)
        assert result.stored == 3
        async with await client.lease(keys) as lease:
            assert [int(b[0]) for b in lease.blocks] == [0, 1, 2]
        with pytest.raises(LeaseExpired):
            lease.blocks  # noqa: B018
    async with AsyncClient(daemon.address, transport="tcp") as client:
        with pytest.raises(Unsupported, match="shared memory"):
            await client.lease(keys)
