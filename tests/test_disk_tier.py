"""The disk tier and the host-over-disk hierarchy, in process, on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.store import Store
from kvstore.tiers.disk import DirectoryInUse, DiskTier
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
    return bytes(out) if tier.read_into([key], [memoryview(out)]) else None


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


def test_a_full_tier_evicts_its_oldest_segment_but_keeps_blocks_read(tmp_path: Path, payloads):
    ks = keys(16)
    size = len(payloads[0])
    record = size + 8192  # at most: a payload plus its header page and padding
    tier = DiskTier(tmp_path, 8 * record, segment_size=2 * record)
    tier.append([(k, meta_of(p), p) for k, p in zip(ks[:6], payloads, strict=False)])
    assert read(tier, ks[0], size) == bytes(payloads[0])  # read: a second chance
    tier.touch([ks[2]])  # read from the tier above: the same
    tier.append([(k, meta_of(p), p) for k, p in zip(ks[6:12], payloads[6:], strict=False)])
    stats = tier.stats()
    assert stats.evictions >= 2
    assert tier.contains(ks[0]) and tier.contains(ks[2])
    assert not tier.contains(ks[1])  # the oldest segments went, with their cold blocks
    assert read(tier, ks[0], size) == bytes(payloads[0])
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= tier.capacity


def test_a_small_host_tier_demotes_to_disk_and_loses_nothing(tmp_path: Path, payloads) -> None:
    """Every put succeeds through a host tier a quarter of their size; every block reads back."""
    host = HostTier(4 * MiB, prefault=False, write_back=True)
    store = Store(
        [host, DiskTier(tmp_path, 64 * MiB, segment_size=4 * MiB)],
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
    store = Store([host, disk], max_block_size=MiB, reserve_timeout=5, dirty_ratio=1.0)
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


def test_a_flipped_bit_in_a_header_costs_that_record_only(tmp_path: Path, payloads) -> None:
    ks = keys(len(payloads))
    tier = DiskTier(tmp_path, 64 * MiB, segment_size=64 * MiB)
    tier.append([(k, meta_of(p), p) for k, p in zip(ks, payloads, strict=True)])
    tier.close()
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    at = data.find(ks[5])  # the key sits in the record's header; flip a bit of its size field
    data[at - 8] ^= 0x01
    segment.write_bytes(data)

    again = DiskTier(tmp_path, 64 * MiB, segment_size=64 * MiB)
    assert [again.contains(k) for k in ks] == [i != 5 for i in range(len(ks))]
    for i, (k, p) in enumerate(zip(ks, payloads, strict=True)):
        assert i == 5 or read(again, k, len(p)) == bytes(p)
    assert again.stats().errors == 1 and "damaged record" in again.stats().last_error
    assert segment.stat().st_size == len(data)  # nothing was cut


def test_a_payload_cannot_forge_a_record_for_a_scan_to_find(tmp_path: Path, payloads) -> None:
    """A payload holding a copy of a real header page is data, never a record."""
    ks = keys(3)
    tier = DiskTier(tmp_path, 64 * MiB)
    tier.append([(ks[0], meta_of(payloads[0]), payloads[0])])
    tier.close()
    (segment,) = segments(tmp_path)
    header_page = segment.read_bytes()[4096:8192]  # record 0's header page, from another file
    forged = memoryview(bytearray(header_page * 4)).cast("B")
    fresh = tmp_path / "other"
    tier = DiskTier(fresh, 64 * MiB)
    tier.append([(ks[1], meta_of(forged), forged), (ks[2], meta_of(payloads[2]), payloads[2])])
    tier.close()
    (other,) = segments(fresh)
    data = bytearray(other.read_bytes())
    data[data.find(ks[1]) - 8] ^= 0x01  # damage the record that holds the forged pages
    other.write_bytes(data)
    again = DiskTier(fresh, 64 * MiB)
    assert not again.contains(ks[0]) and not again.contains(ks[1])
    assert read(again, ks[2], len(payloads[2])) == bytes(payloads[2])


def test_deleted_space_comes_back_and_no_live_block_is_evicted(tmp_path: Path, payloads) -> None:
    """Rounds of puts and deletes write twice the tier's capacity; the live blocks fit it."""
    record = len(payloads[0]) + 4096
    tier = DiskTier(tmp_path, 24 * record, segment_size=4 * record)
    live: list[tuple[bytes, memoryview]] = []
    for round_ in range(8):
        ks = keys(6, f"round{round_}".encode())
        batch = [(k, payloads[(round_ + i) % len(payloads)]) for i, k in enumerate(ks)]
        tier.append([(k, meta_of(p), p) for k, p in batch])
        tier.delete([k for k, _ in batch[2:]])
        live += batch[:2]
    assert tier.stats().evictions == 0
    assert all(read(tier, k, len(p)) == bytes(p) for k, p in live)
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= tier.capacity
    tier.maintain()  # idle: the dead records left go too
    assert tier.file_bytes() <= 2 * len(live) * record


def test_a_block_read_since_it_was_written_outlives_its_segment(tmp_path: Path, payloads) -> None:
    record = len(payloads[0]) + 4096
    tier = DiskTier(tmp_path, 8 * record, segment_size=2 * record)
    first = keys(4, b"first")
    tier.append([(k, meta_of(p), p) for k, p in zip(first, payloads, strict=False)])
    assert read(tier, first[1], len(payloads[1])) == bytes(payloads[1])  # a hit
    later = keys(6, b"later")
    for k, p in zip(later, payloads[4:], strict=False):  # more than the tier holds
        tier.append([(k, meta_of(p), p)])
    assert tier.stats().evictions > 0 and not tier.contains(first[0])
    assert read(tier, first[1], len(payloads[1])) == bytes(payloads[1])


def test_two_tiers_cannot_share_a_directory(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 64 * MiB)
    with pytest.raises(DirectoryInUse, match="in use by another kvstore-server"):
        DiskTier(tmp_path, 64 * MiB)
    tier.close()
    DiskTier(tmp_path, 64 * MiB).close()  # free again once the first has closed
