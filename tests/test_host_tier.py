"""The host tier through its own API: arena placement, LRU, pins, back-pressure."""

import threading

import pytest

from kvstore.arena import ALIGN, Arena
from kvstore.errors import ResourceExhausted
from kvstore.limits import BLOCK_OVERHEAD
from kvstore.meta import BlockMeta
from kvstore.tiers.host import HostTier

MiB = 1 << 20
BLOCK = MiB - ALIGN  # a slot plus the block's index overhead fits one MiB of capacity


def put(tier: HostTier, key: bytes, payload: bytes) -> bool:
    slot = tier.reserve(len(payload), timeout=0)
    slot.view[:] = payload
    return tier.commit(key, BlockMeta(size=len(payload)), slot)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_arena_coalesces_free_extents() -> None:
    arena = Arena(4 * MiB, prefault=False)
    a, b, c = (arena.alloc(MiB) for _ in range(3))
    assert (a, b, c) == (0, MiB, 2 * MiB)
    arena.release(a, MiB)
    arena.release(c, MiB)
    assert arena.alloc(3 * MiB) is None  # two separate holes of 1 and 2 MiB
    assert arena.release(b, MiB) == (0, 4 * MiB)  # merged with both neighbours
    assert arena.alloc(4 * MiB) == 0
    assert arena.used == 4 * MiB


def test_arena_aligns_slots() -> None:
    arena = Arena(MiB, prefault=False)
    offsets = [arena.alloc(n) for n in (1, 63, 65, 7)]
    assert all(o % ALIGN == 0 for o in offsets)
    assert len(set(offsets)) == 4


def test_committed_bytes_read_back_and_duplicates_are_refused() -> None:
    tier = HostTier(MiB, prefault=False)
    assert put(tier, key(1), b"abc")
    assert not put(tier, key(1), b"xyz")  # already present: the new slot is freed
    [block] = tier.pin_prefix([key(1)])
    assert bytes(block.view) == b"abc"
    tier.unpin(block)
    stats = tier.stats()
    assert stats.blocks == 1 and stats.payload_bytes == 3
    assert stats.bytes == ALIGN + BLOCK_OVERHEAD  # the slot it takes, and its index entry
    assert tier.arena.used == ALIGN


def test_reserved_block_is_invisible_until_committed() -> None:
    tier = HostTier(MiB, prefault=False)
    slot = tier.reserve(100, timeout=0)
    assert not tier.contains(key(1))
    tier.abort(slot)
    assert tier.arena.used == 0


def test_lru_evicts_the_coldest_unpinned_block() -> None:
    tier = HostTier(4 * MiB, prefault=False)
    for i in range(4):
        put(tier, key(i), bytes([i]) * BLOCK)
    tier.unpin(*tier.pin_prefix([key(0)]))  # a read makes key 0 the warmest
    put(tier, key(4), b"\x04" * BLOCK)
    assert not tier.contains(key(1))
    assert all(tier.contains(key(i)) for i in (0, 2, 3, 4))
    assert tier.stats().evictions == 1


def test_pinned_block_survives_eviction_pressure_and_delete() -> None:
    tier = HostTier(2 * MiB, prefault=False)
    put(tier, key(0), b"\x00" * BLOCK)
    [pinned] = tier.pin_prefix([key(0)])
    assert tier.delete([key(0)]) == 1
    assert not tier.contains(key(0))  # hidden at once
    for i in range(1, 4):  # churn the only free megabyte
        put(tier, key(i), bytes([i]) * BLOCK)
    assert bytes(pinned.view) == b"\x00" * BLOCK  # never reused under the reader
    tier.unpin(pinned)
    put(tier, key(9), b"\x09" * BLOCK)  # freed now: two blocks fit again
    assert tier.contains(key(3)) and tier.contains(key(9))


def test_full_of_pinned_blocks_a_writer_waits_then_fails() -> None:
    tier = HostTier(MiB, prefault=False)
    put(tier, key(0), b"\x00" * BLOCK)
    [pinned] = tier.pin_prefix([key(0)])
    with pytest.raises(ResourceExhausted, match="pinned"):
        tier.reserve(BLOCK, timeout=0.05)
    waiting = threading.Thread(target=lambda: tier.reserve(BLOCK, timeout=30))
    waiting.start()
    tier.unpin(pinned)  # wakes the writer, which now evicts key 0
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert not tier.contains(key(0))


def test_block_larger_than_the_tier_is_refused() -> None:
    tier = HostTier(MiB, prefault=False)
    with pytest.raises(ResourceExhausted, match="it holds 1048576"):
        tier.reserve(MiB + 1, timeout=0)


def test_pin_prefix_stops_at_the_first_gap() -> None:
    tier = HostTier(MiB, prefault=False)
    for i in (0, 1, 3):
        put(tier, key(i), b"x")
    blocks = tier.pin_prefix([key(i) for i in range(4)])
    assert [b.key for b in blocks] == [key(0), key(1)]
    assert tier.present_prefix([key(i) for i in range(4)]) == 2
    for b in blocks:
        tier.unpin(b)
    assert tier.stats().misses == 1 and tier.stats().hits == 2
