"""The disk tier and the host-over-disk hierarchy, in process, on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.store import Store
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

MiB = 1 << 20


@pytest.fixture
def payloads(kv_sample: np.ndarray) -> list[memoryview]:
    """Sixteen distinct blocks of real KV, 16 tokens (360 KiB) each."""
    raw = kv_sample.reshape(len(kv_sample), -1)
    return [
        memoryview(np.ascontiguousarray(raw[i * 16 : i * 16 + 16])).cast("B") for i in range(16)
    ]


def keys(n: int, salt: bytes = b"disk") -> list[bytes]:
    return block_keys(np.arange(n * 4), 4, salt)


def meta_of(payload: memoryview) -> BlockMeta:
    return BlockMeta(len(payload), "float16", (len(payload) // 2,), "test", "", 0, 0)


def read(tier: DiskTier, key: bytes, size: int) -> bytes | None:
    out = bytearray(size)
    return bytes(out) if tier.read_into(key, memoryview(out)) else None


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.kvs"))


@pytest.mark.parametrize("fsync", ["batch", "interval", "never"])
def test_blocks_survive_a_restart_byte_for_byte(tmp_path: Path, payloads, fsync: str) -> None:
    ks = keys(len(payloads))
    tier = DiskTier(tmp_path, 64 * MiB, segment_size=4 * MiB, fsync=fsync)
    assert tier.append([(k, meta_of(p), p) for k, p in zip(ks, payloads, strict=True)]) == 16
    assert tier.append([(ks[0], meta_of(payloads[0]), payloads[0])]) == 0  # already there
    tier.close()
    assert len(segments(tmp_path)) > 1  # rolled over

    again = DiskTier(tmp_path, 64 * MiB, segment_size=4 * MiB)
    assert again.present_prefix(ks) == len(ks)
    assert again.meta(ks[3]) == meta_of(payloads[3])
    for k, p in zip(ks, payloads, strict=False):
        assert read(again, k, len(p)) == bytes(p)
    assert again.stats().blocks == len(ks) and again.stats().errors == 0


def test_a_torn_tail_is_cut_and_the_rest_served(tmp_path: Path, payloads) -> None:
    ks = keys(4)
    tier = DiskTier(tmp_path, 64 * MiB)
    tier.append([(k, meta_of(p), p) for k, p in zip(ks, payloads, strict=False)])
    tier.close()
    (segment,) = segments(tmp_path)
    whole = segment.stat().st_size
    with open(segment, "r+b") as f:  # the last record loses its end, as if the write was cut
        f.truncate(whole - 1000)

    again = DiskTier(tmp_path, 64 * MiB)
    assert again.present_prefix(ks) == 3
    assert [read(again, k, len(p)) for k, p in zip(ks[:3], payloads, strict=False)] == [
        bytes(p) for p in payloads[:3]
    ]
    assert segment.stat().st_size < whole - 1000  # cut back to the last whole record


def test_a_corrupt_block_is_dropped_and_reported_never_served(tmp_path: Path, payloads) -> None:
    ks = keys(3)
    tier = DiskTier(tmp_path, 64 * MiB)
    tier.append([(k, meta_of(p), p) for k, p in zip(ks, payloads, strict=False)])
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())  # flip one byte in the middle of the second payload
    offset = data.find(bytes(payloads[1][:4096])) + len(payloads[1]) // 2
    data[offset] ^= 0x40
    segment.write_bytes(data)

    assert read(tier, ks[1], len(payloads[1])) is None
    stats = tier.stats()
    assert stats.errors == 1 and "checksum" in stats.last_error
    assert not tier.contains(ks[1])
    assert read(tier, ks[0], len(payloads[0])) == bytes(payloads[0])
    assert read(tier, ks[2], len(payloads[2])) == bytes(payloads[2])


def test_deleted_blocks_stay_deleted_after_restart(tmp_path: Path, payloads) -> None:
    ks = keys(4)
    tier = DiskTier(tmp_path, 64 * MiB)
    tier.append([(k, meta_of(p), p) for k, p in zip(ks, payloads, strict=False)])
    assert tier.delete([ks[1], ks[1], keys(1, b"never")[0]]) == 1
    tier.close()
    again = DiskTier(tmp_path, 64 * MiB)
    assert [again.contains(k) for k in ks] == [True, False, True, True]


def test_a_full_tier_drops_its_least_recently_used_segment(tmp_path: Path, payloads) -> None:
    ks = keys(16)
    size = len(payloads[0])
    record = size + 8192  # at most: a payload plus its header page and padding
    tier = DiskTier(tmp_path, 8 * record, segment_size=2 * record)
    tier.append([(k, meta_of(p), p) for k, p in zip(ks[:6], payloads, strict=False)])
    assert read(tier, ks[0], size) == bytes(payloads[0])  # the first segment is now warm
    tier.append([(k, meta_of(p), p) for k, p in zip(ks[6:12], payloads[6:], strict=False)])
    stats = tier.stats()
    assert stats.evictions >= 2
    assert tier.contains(ks[0]) and tier.contains(ks[1])  # kept: read most recently
    assert not tier.contains(ks[2])  # the coldest segment went
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= tier.capacity


def test_a_small_host_tier_demotes_to_disk_and_loses_nothing(tmp_path: Path, payloads) -> None:
    """Every put succeeds through a host tier a quarter of their size; every block reads back."""
    host = HostTier(4 * MiB, prefault=False, write_back=True)
    store = Store(
        host,
        disk=DiskTier(tmp_path, 64 * MiB, segment_size=4 * MiB),
        max_block_size=MiB,
        reserve_timeout=30,
        dirty_ratio=0.5,
    )
    ks = keys(len(payloads))
    try:
        for k, p in zip(ks, payloads, strict=False):
            slot = store.reserve(len(p))
            slot.view[:] = p
            assert store.commit(k, meta_of(p), slot)
        assert store.lookup(ks)[0] == "disk" and store.lookup(ks)[-1] == "host"
        for i in range(0, len(ks), 4):  # a read pins its blocks in DRAM: a quarter at a time
            with store.read(ks[i : i + 4]) as batch:
                got = [bytes(b.view) for b in batch.blocks]
                assert got == [bytes(p) for p in payloads[i : i + 4]]
        with store.read(ks) as batch:  # more than DRAM holds: the prefix that fits, at once
            assert 0 < len(batch.blocks) < len(ks)
        host_stats, disk_stats = store.stats().tiers
        assert host_stats.demotions >= len(ks) - 6 and host_stats.evictions > 0
        assert disk_stats.promotions > 0 and disk_stats.errors == 0
    finally:
        store.close()


def test_persist_writes_every_host_block_down(tmp_path: Path, payloads) -> None:
    host = HostTier(16 * MiB, prefault=False, write_back=True)
    disk = DiskTier(tmp_path, 64 * MiB)
    store = Store(host, disk=disk, max_block_size=MiB, reserve_timeout=5, dirty_ratio=1.0)
    ks = keys(4)
    for k, p in zip(ks, payloads, strict=False):
        slot = store.reserve(len(p))
        slot.view[:] = p
        store.commit(k, meta_of(p), slot)
    assert not any(disk.contains(k) for k in ks)  # under the dirty ratio: still only in DRAM
    store.close(persist=True)
    again = DiskTier(tmp_path, 64 * MiB)
    assert [read(again, k, len(p)) for k, p in zip(ks, payloads, strict=False)] == [
        bytes(p) for p in payloads[:4]
    ]
