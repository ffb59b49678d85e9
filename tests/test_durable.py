"""Durable puts: an acknowledged block is on disk and synced, or the put fails naming the
disk. Real daemons (crashed with SIGKILL, restarted on the same directory), and a real
Store over a real directory where the demoter's timing has to be pinned down."""

from __future__ import annotations

import errno
import os
import resource
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import running_daemon
from kvstore.errors import ResourceExhausted, Unavailable
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.store import Store
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

MiB = 1 << 20


def disk_daemon(directory: Path, *flags: str, **popen: object):
    return running_daemon(
        "--disk-dir", str(directory), "--disk-capacity", "4GiB", "--prefault", "false", *flags,
        **popen,
    )  # fmt: skip


def random_blocks(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def assert_all_served(client, acked: dict[bytes, np.ndarray]) -> None:
    """Every acknowledged block is served, byte for byte (one at a time: DRAM is small)."""
    lost = [key.hex() for key in acked if not client.get([key])]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged durable blocks lost"
    for key, want in acked.items():
        assert np.array_equal(client.get([key])[0].view(np.uint8).ravel(), want), key.hex()


def crash(daemon) -> None:
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_durable_puts_on_a_full_disk_fail_naming_it(tmp_path, rng, transport) -> None:
    """Files may not pass 4 MiB (RLIMIT_FSIZE): writes beyond fail with EFBIG, as on a full
    disk. The demoter takes every block at once (dirty ratio 0), so it, not the put, meets
    the failure first. Puts past the full point fail; none is acknowledged and lost."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, no signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * MiB, 4 * MiB))

    keys = block_keys(np.arange(40 * 4), 4, f"full/{transport}".encode())
    blocks = random_blocks(rng, len(keys), 256 << 10)
    flags = ("--host-capacity", "2MiB", "--segment-size", "16MiB")  # (the arena is a file too)
    acked: dict[bytes, np.ndarray] = {}
    refused: list[str] = []
    with (
        disk_daemon(tmp_path, *flags, "--dirty-ratio", "0", preexec_fn=limit_file_size) as d,
        d.client(transport=transport) as c,
    ):
        for key, block in zip(keys, blocks, strict=True):
            try:
                c.put([key], [block], durable=True)
                acked[key] = block
            except ResourceExhausted as exc:
                refused.append(str(exc))
        stats = c.stats().tiers[1]
        assert stats.errors > 0 and "too large" in stats.last_error
        (fresh,) = block_keys(np.arange(4), 4, b"plain")
        c.put([fresh], blocks[:1])  # still serving: a plain put is a cache entry
        assert np.array_equal(c.get([fresh])[0].view(np.uint8).ravel(), blocks[0])
        crash(d)
    assert len(acked) >= 5 and len(refused) >= 20, (len(acked), len(refused))
    assert all(str(tmp_path) in message and "not on disk" in message for message in refused)
    with disk_daemon(tmp_path, *flags) as d, d.client() as c:
        assert_all_served(c, acked)


def test_acknowledged_durable_blocks_survive_sigkill_racing_the_demoter(tmp_path, rng) -> None:
    """Dirty ratio 0: the demoter takes every block as soon as it is committed. Each round,
    four writers make 19 durable puts at once, then a 20th makes durable blocks the demoter
    has just taken, behind 24 MiB of others; the daemon is killed right after that
    acknowledgement, five times over. Every acknowledged block comes back, byte for byte."""
    flags = ("--host-capacity", "128MiB", "--dirty-ratio", "0", "--fsync", "batch")
    small = random_blocks(rng, 8, 96 << 10)
    big = random_blocks(rng, 24, MiB)  # with the small ones: one part (< host / 4), one batch
    acked: dict[bytes, np.ndarray] = {}
    for round_ in range(5):
        with disk_daemon(tmp_path, *flags) as d:
            with d.client() as c:  # what the last crash left
                assert_all_served(c, acked)
            acked.update(_durable_puts(d, round_, small, puts=19))
            keys = block_keys(np.arange((len(big) + 4) * 4), 4, f"{round_}/last".encode())
            with d.client(transport="shm") as plain, d.client(transport="tcp") as c:
                plain.put(keys, [*big, *small[:4]])  # one demoter batch, the small ones last
                c.put(keys[-4:], small[:4], durable=True)
                crash(d)  # right after the acknowledgement
            acked.update(zip(keys[-4:], small[:4], strict=True))
    with disk_daemon(tmp_path, *flags) as d, d.client() as c:
        assert_all_served(c, acked)


def _durable_puts(d, round_: int, small: list[np.ndarray], puts: int) -> dict[bytes, np.ndarray]:
    """`puts` durable puts of three blocks, from four writers at once. Returns the blocks."""
    acked: dict[bytes, np.ndarray] = {}
    lock = threading.Lock()

    def write(n: int) -> None:
        with d.client(transport="tcp") as c:
            for i in range(n, puts, 4):
                keys = block_keys(np.arange(3 * 4), 4, f"{round_}/{i}".encode())
                chosen = [small[(i + j) % len(small)] for j in range(3)]
                c.put(keys, chosen, durable=True)
                with lock:
                    acked.update(zip(keys, chosen, strict=True))

    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(write, n) for n in range(4)]:
            done.result()
    assert len(acked) == puts * 3
    return acked


def meta_of(payload: memoryview) -> BlockMeta:
    return BlockMeta(len(payload), "uint8", (len(payload),), "test", "", 0, 0)


def on_disk(directory: Path, payload: bytes) -> bool:
    """Whether `payload` is in a segment file now (what a crash of the daemon keeps)."""
    return any(payload in path.read_bytes() for path in directory.glob("seg-*.kvs"))


def test_make_durable_waits_for_the_demoters_write_of_its_block(tmp_path, rng) -> None:
    """The demoter has taken the block and is held before its write: a durable put must
    not return until that write is done (then the record is in the file), nor hang."""
    disk = DiskTier(tmp_path, 64 * MiB)
    store = Store(
        [HostTier(16 * MiB, prefault=False, write_back=True), disk],
        max_block_size=MiB,
        reserve_timeout=5,
        dirty_ratio=0,
    )
    taken, release = threading.Event(), threading.Event()
    append = disk.append

    def held_append(blocks):  # the demoter's writes wait for `release`
        if threading.current_thread().name == "kvstore-demoter":
            taken.set()
            assert release.wait(30)
        return append(blocks)

    disk.append = held_append
    payload = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (key,) = block_keys(np.arange(4), 4, b"held")
    slot = store.reserve(len(payload))
    slot.view[:] = payload
    outcome: list[object] = []

    def durable_put() -> None:
        try:
            store.make_durable([key])
            outcome.append(on_disk(tmp_path, payload))
        except BaseException as exc:  # (reported below)
            outcome.append(exc)

    try:
        assert store.commit(key, meta_of(memoryview(payload)), slot)
        assert taken.wait(30)  # the demoter holds it now (dirty ratio 0)
        putter = threading.Thread(target=durable_put)
        putter.start()
        putter.join(0.5)  # without a fix it is back by now, the block not yet written
        release.set()
        putter.join(30)
        assert outcome == [True]
    finally:
        release.set()
        store.close()


def test_a_durable_put_of_blocks_present_only_in_dram_writes_them(tmp_path, rng) -> None:
    """Put plainly first (dirty ratio 1: they stay in DRAM), then durably through shared
    memory, where present blocks get no slot: they must reach the disk all the same."""
    keys = block_keys(np.arange(4 * 4), 4, b"present")
    blocks = random_blocks(rng, len(keys), 128 << 10)
    flags = ("--host-capacity", "16MiB", "--dirty-ratio", "1")
    with disk_daemon(tmp_path, *flags) as d, d.client(transport="shm") as c:
        c.put(keys[:2], blocks[:2])
        assert c.put(keys, blocks, durable=True).existed == 2
        crash(d)
    with disk_daemon(tmp_path, *flags) as d, d.client() as c:
        assert_all_served(c, dict(zip(keys, blocks, strict=True)))


def test_a_failed_sync_fails_the_durable_put_and_a_retry_writes_again(
    tmp_path, rng, monkeypatch
) -> None:
    """fdatasync fails (EIO, as from a failing device): the records it should have covered
    may never reach the disk, so they are forgotten and the put fails naming the disk; a
    retry once the device recovers writes the block anew."""
    disk = DiskTier(tmp_path, 64 * MiB)
    payload = memoryview(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    (key,) = block_keys(np.arange(4), 4, b"eio")
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(Unavailable, match=f"disk tier {tmp_path}.*Input/output error"):
        disk.persist([(key, meta_of(payload), payload)], [key])
    assert not disk.contains(key) and "1 unsynced blocks lost" in disk.stats().last_error
    monkeypatch.setattr(os, "fdatasync", real)
    disk.persist([(key, meta_of(payload), payload)], [key])
    disk.close()
    again = DiskTier(tmp_path, 64 * MiB)
    out = bytearray(len(payload))
    assert again.read_into([key], [memoryview(out)]) and out == payload
    again.close()


def test_a_durable_put_writes_a_block_held_on_the_device(tmp_path, rng) -> None:
    pytest.importorskip("torch")
    from kvstore.tiers.device import DeviceTier

    store = Store(
        [
            DeviceTier(4 * MiB, "cpu"),
            HostTier(16 * MiB, prefault=False, write_back=True),
            DiskTier(tmp_path, 64 * MiB),
        ],
        max_block_size=MiB,
        reserve_timeout=5,
        dirty_ratio=1,
    )
    payload = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (key,) = block_keys(np.arange(4), 4, b"device")
    slot = store.reserve(len(payload))
    slot.view[:] = payload
    try:
        assert store.commit(key, meta_of(memoryview(payload)), slot)
        assert store.fastest([key]) == ["device"] and not store.disk.contains(key)
        store.make_durable([key])
        assert on_disk(tmp_path, payload)
    finally:
        store.close()
