"""A Store walks its tiers as one list, fastest first; what each kind of tier is called on
the wire, in Redis and in events comes from one registry."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from kvstore import store as store_module
from kvstore.cluster.layout import TIERS, tier_code, words
from kvstore.cluster.scoring import DEFAULT_WEIGHTS
from kvstore.errors import Unsupported
from kvstore.events import EventLog, decode_batch
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.store import Store
from kvstore.tiers.base import AcceleratorTier, BackingTier, MemoryTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.registry import TIER_REGISTRY

MiB = 1 << 20
BLOCK = 256 << 10


@pytest.fixture
def payloads(rng: np.random.Generator) -> list[bytes]:
    return [rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes() for _ in range(12)]


def meta_of(payload: bytes) -> BlockMeta:
    return BlockMeta(len(payload), "uint8", (len(payload),), "test", "", 0, 0)


def put(store: Store, keys: list[bytes], payloads: list[bytes]) -> None:
    for key, payload in zip(keys, payloads, strict=True):
        slot = store.reserve(len(payload))
        slot.view[:] = payload
        assert store.commit(key, meta_of(payload), slot)


def on_disk_only(directory: Path, keys: list[bytes], payloads: list[bytes]) -> None:
    """Leave `keys` in `directory`'s disk tier, and nowhere else."""
    store = Store(
        [HostTier(8 * MiB, prefault=False, write_back=True), DiskTier(directory, 64 * MiB)],
        max_block_size=MiB,
        reserve_timeout=5,
        dirty_ratio=1,
    )
    put(store, keys, payloads)
    store.close(persist=True)


def host_and_disk(directory: Path, host_capacity: int = 8 * MiB) -> Store:
    host = HostTier(host_capacity, prefault=False, write_back=True)
    return Store([host, DiskTier(directory, 64 * MiB)], max_block_size=MiB, reserve_timeout=5)


def test_the_tiers_answer_their_protocols_by_shape(tmp_path) -> None:
    host, disk = HostTier(MiB, prefault=False), DiskTier(tmp_path, 8 * MiB)
    disk.close()
    assert isinstance(host, MemoryTier) and not isinstance(host, BackingTier)
    assert isinstance(disk, BackingTier) and not isinstance(disk, MemoryTier)
    assert not isinstance(disk, AcceleratorTier) and not isinstance(host, AcceleratorTier)
    pytest.importorskip("torch")
    from kvstore.tiers.device import DeviceTier

    device = DeviceTier(MiB, "cpu")
    assert isinstance(device, AcceleratorTier) and not isinstance(device, MemoryTier)


def test_tiers_out_of_order_are_refused(tmp_path) -> None:
    host = HostTier(MiB, prefault=False, write_back=True)
    disk = DiskTier(tmp_path, 8 * MiB)
    try:
        for tiers in ([disk, host], [host, host], [disk]):
            with pytest.raises(ValueError, match="tiers: expected"):
                Store(tiers, max_block_size=MiB, reserve_timeout=1)
        with pytest.raises(ValueError, match="must write back"):
            Store([HostTier(MiB, prefault=False), disk], max_block_size=MiB, reserve_timeout=1)
    finally:
        disk.close()


def test_a_host_only_store_evicts_and_has_nothing_below(payloads) -> None:
    """Twelve blocks through a host tier that holds four: the oldest are gone, not demoted."""
    store = Store([HostTier(MiB + MiB // 8, prefault=False)], max_block_size=MiB, reserve_timeout=1)
    keys = block_keys(np.arange(48), 4, b"host-only")
    put(store, keys, payloads)
    assert store.disk is None and [t.name for t in store.stats().tiers] == ["host"]
    assert store.fastest(keys) == [None] * 8 + ["host"] * 4
    with store.read(keys[8:]) as batch:
        assert [bytes(b.view) for b in batch.blocks] == payloads[8:]
    with pytest.raises(Unsupported, match="need a disk tier"):
        store.make_durable(keys[8:])
    store.close()


def test_demotion_goes_down_the_list_and_a_get_brings_the_run_back_up(tmp_path, payloads) -> None:
    """Host and disk: what DRAM cannot hold is written down, not dropped; a get of blocks
    found only on disk reads them up as one batch, and they are in DRAM again after."""
    keys = block_keys(np.arange(48), 4, b"order")
    store = host_and_disk(tmp_path, host_capacity=2 * MiB)
    try:
        put(store, keys, payloads)  # three times what DRAM holds
        tiers = store.fastest(keys)
        assert tiers[0] == "disk" and tiers[-1] == "host" and None not in tiers
        assert [t.name for t in store.stats().tiers] == ["host", "disk"]
    finally:
        store.close()

    reads: list[int] = []
    store = host_and_disk(tmp_path)  # the same disk, a cold DRAM
    read_into = store.disk.read_into
    store.disk.read_into = lambda ks, outs: reads.append(len(ks)) or read_into(ks, outs)
    try:
        assert store.fastest(keys[:4]) == ["disk"] * 4
        with store.read(keys[:4]) as batch:
            assert [bytes(b.view) for b in batch.blocks] == payloads[:4]
            assert not batch.truncated
        assert reads == [4]  # one call into the backing tier for the run
        assert store.fastest(keys[:4]) == ["host"] * 4  # promoted
        host, disk = store.stats().tiers
        assert disk.promotions == 4 and disk.hits == 4 and host.hits == 4
    finally:
        store.close()


def test_without_promotion_a_read_leaves_dram_as_it_was(tmp_path, payloads) -> None:
    keys = block_keys(np.arange(16), 4, b"no-promote")
    on_disk_only(tmp_path, keys, payloads[:4])
    host = HostTier(8 * MiB, prefault=False, write_back=True)
    disk = DiskTier(tmp_path, 64 * MiB)
    store = Store([host, disk], max_block_size=MiB, reserve_timeout=5, promote=False)
    try:
        with store.read(keys) as batch:
            assert [bytes(b.view) for b in batch.blocks] == payloads[:4]
        assert store.fastest(keys) == ["disk"] * 4 and store.stats().tiers[1].promotions == 0
    finally:
        store.close()


def test_a_read_that_outlasts_its_get_releases_its_blocks(tmp_path, payloads, monkeypatch) -> None:
    """The get stops waiting at once (no time to wait): it answers truncated, and the read,
    once done, leaves the blocks promoted and unpinned (DRAM can be wholly reclaimed)."""
    keys = block_keys(np.arange(16), 4, b"slow")
    on_disk_only(tmp_path, keys, payloads[:4])
    store = host_and_disk(tmp_path)
    monkeypatch.setattr(store_module, "READ_TIMEOUT", 0)
    go = threading.Event()
    read_into = store.disk.read_into
    store.disk.read_into = lambda ks, outs: go.wait() and read_into(ks, outs)
    try:
        with store.read(keys) as batch:
            assert batch.blocks == [] and batch.truncated
        go.set()
    finally:
        store.close()  # waits for the read
    assert store.fastest(keys) == ["host"] * 4
    whole = store.host.reserve(8 * MiB - 4096, 0)  # all of DRAM: nothing is left pinned
    assert store.fastest(keys) == ["disk"] * 4
    store.host.abort(whole)


def test_each_registry_entry_round_trips_through_the_index_and_the_events() -> None:
    """Names and codes are on the wire, in Redis and in events: they never change."""
    assert [(t.name, t.code) for t in TIER_REGISTRY] == [("device", 0), ("host", 1), ("disk", 2)]
    assert len(TIER_REGISTRY) <= 4  # two bits of an index word
    with EventLog(flush_interval=3600) as log:
        for tier in TIER_REGISTRY:
            assert tier_code(tier.name) == tier.code and TIERS[tier.code] == tier.name
            assert words(struct.pack(">I", 7 * 4 + tier.code)) == {7: tier.code}
            assert DEFAULT_WEIGHTS[tier.name] == tier.weight
            log.stored([bytes(16)], tier.name)
            log.removed([bytes(16)], tier.name)
            events = decode_batch(log.flush().payload).events
            assert [e.medium for e in events] == [tier.medium, tier.medium]
