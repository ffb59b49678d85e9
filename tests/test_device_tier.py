"""The device tier: batched moves, LRU, and the device > host > disk hierarchy.

Each test runs on torch's CPU device (CI) and on CUDA where there is a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import running_daemon
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.store import Store
from kvstore.tiers.device import DeviceTier, device_available
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

pytest.importorskip("torch")

MiB = 1 << 20


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    if not device_available(request.param):
        pytest.skip(f"no {request.param} device here")
    return request.param


@pytest.fixture(scope="module")
def blocks(kv_sample: np.ndarray) -> list[np.ndarray]:
    """32 distinct 16-token blocks of real KV (360 KiB each), as bytes."""
    return [np.ascontiguousarray(row) for row in kv_sample.reshape(32, -1).view(np.uint8)]


def meta_of(block: np.ndarray) -> BlockMeta:
    return BlockMeta(block.nbytes, "float16", (block.nbytes // 2,))


def test_blocks_go_up_and_come_back_down_intact(device: str, blocks) -> None:
    size = blocks[0].nbytes
    tier = DeviceTier(5 * size, device)
    keys = block_keys(np.arange(40), 4, b"dev")[:8]
    together = memoryview(np.concatenate(blocks[:4]))  # back to back: one extent, one copy
    ups = [together[i * size : (i + 1) * size] for i in range(4)]
    assert (
        tier.put_batch([(k, meta_of(b), v) for k, b, v in zip(keys, blocks, ups, strict=False)])
        == 4
    )
    assert tier.put_batch([(keys[0], meta_of(blocks[0]), ups[0])]) == 0  # already there
    assert tier.delete([keys[1], keys[3]]) == 2  # holes of one and two blocks
    more = memoryview(np.concatenate(blocks[4:7]))  # fits no hole whole: scattered on the device
    ups = [more[i * size : (i + 1) * size] for i in range(3)]
    assert (
        tier.put_batch(
            [(k, meta_of(b), v) for k, b, v in zip(keys[4:], blocks[4:], ups, strict=False)]
        )
        == 3
    )

    order = [keys[0], keys[2], keys[4], keys[5], keys[6]]
    expected = [blocks[i] for i in (0, 2, 4, 5, 6)]
    down = memoryview(np.zeros(5 * size, np.uint8))  # back to back on the host: gathered
    outs = [down[i * size : (i + 1) * size] for i in range(5)]
    assert tier.read_batch(order, outs) == [meta_of(b) for b in expected]
    assert all(
        np.array_equal(np.frombuffer(o, np.uint8), b) for o, b in zip(outs, expected, strict=True)
    )

    apart = [np.zeros(size + 4096, np.uint8) for _ in range(3)]  # one copy each
    assert len(tier.read_batch([*order[2:], keys[1]], [memoryview(a) for a in apart])) == 3
    assert all(np.array_equal(a[:size], b) for a, b in zip(apart, expected[2:], strict=True))
    stats = tier.stats()
    assert stats.blocks == 5 and stats.hits == 8 and stats.misses == 1 and stats.bytes == 5 * size


def test_victims_are_the_least_recently_used(device: str, blocks) -> None:
    size = blocks[0].nbytes
    tier = DeviceTier(4 * size, device)
    keys = block_keys(np.arange(16), 4, b"lru")
    tier.put_batch([(k, meta_of(b), memoryview(b)) for k, b in zip(keys, blocks, strict=False)])
    tier.read_batch(keys[:1], [memoryview(np.empty(size, np.uint8))])  # block 0 is warm now
    assert [k for k, _ in tier.victims(2 * size)] == keys[1:3]
    assert tier.delete(keys[1:3], demoted=True) == 2
    assert tier.stats().demotions == 2 and tier.free_bytes() == 2 * size


def test_device_host_and_disk_work_as_one_hierarchy(device: str, tmp_path: Path, blocks) -> None:
    """Eight blocks fit on the device, five in DRAM: sixteen puts spread over all three.
    A block the device must make room for stays in DRAM when DRAM has none free at once."""
    size = blocks[0].nbytes
    host = HostTier(2 * MiB, prefault=False, write_back=True)
    accelerator = DeviceTier(8 * size, device)
    accelerator.register_host(host.arena.memory)
    store = Store(
        [accelerator, host, DiskTier(tmp_path, 64 * MiB)], max_block_size=MiB, reserve_timeout=30
    )
    keys = block_keys(np.arange(64), 4, b"three")
    try:
        for k, b in zip(keys, blocks[:16], strict=False):
            slot = store.reserve(b.nbytes)
            slot.view[:] = b
            assert store.commit(k, meta_of(b), slot)
        slot = store.reserve(size)
        assert not store.commit(keys[15], meta_of(blocks[15]), slot)  # already on the device
        tiers = store.lookup(keys[:16])
        assert tiers.count("device") == 8 and tiers[-1] == "device" and "disk" in tiers
        for i in range(0, 16, 4):
            with store.read(keys[i : i + 4]) as batch:
                got = [np.frombuffer(b.view, np.uint8) for b in batch.blocks]
                assert all(
                    np.array_equal(g, b) for g, b in zip(got, blocks[i : i + 4], strict=True)
                )
        device_stats, host_stats, disk_stats = store.stats().tiers
        assert device_stats.demotions > 0 and device_stats.hits == 8
        assert host_stats.demotions > 0 and disk_stats.blocks > 0
        assert store.delete(keys[:16]) == 16 and store.lookup(keys[:1]) == []
    finally:
        store.close()


def test_daemon_serves_from_its_device_tier(device: str, blocks) -> None:
    keys = block_keys(np.arange(32), 4, b"daemon")
    flags = ("--device-capacity", "2MiB", "--device", device, "--host-capacity", "8MiB")
    with running_daemon(*flags) as d, d.client(transport="tcp") as c:
        assert c.put(keys[:8], blocks[:8]).stored == 8
        assert c.lookup_tiers(keys[:8]) == ["host"] * 3 + ["device"] * 5
        got = c.get(keys[:8])
        assert all(np.array_equal(g.ravel(), b) for g, b in zip(got, blocks, strict=False))
        assert [t.name for t in c.stats().tiers] == ["device", "host"]


def test_a_device_tier_without_a_device_is_left_out_with_a_warning() -> None:
    if device_available("cuda"):
        pytest.skip("this machine has a GPU")
    with running_daemon("--device-capacity", "1MiB") as d, d.client() as c:
        assert [t.name for t in c.stats().tiers] == ["host"]
        d.process.terminate()
        assert "without a device tier" in d.process.communicate(timeout=30)[1]
