"""The daemon over host and disk tiers: demotion, restarts, crashes, bad disks."""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import running_daemon
from kvstore.errors import Unsupported
from kvstore.keys import block_keys

MiB = 1 << 20
HOST = "2MiB"  # five 360 KiB blocks: most of every batch below must go to disk


@pytest.fixture(scope="module")
def blocks(kv_sample: np.ndarray) -> list[np.ndarray]:
    """32 distinct 16-token blocks of real KV (360 KiB each)."""
    raw = kv_sample.reshape(32, -1).view(np.uint8)
    return [np.ascontiguousarray(row) for row in raw]


def disk_daemon(directory: Path, *flags: str, **popen: object):
    return running_daemon(
        "--host-capacity", HOST, "--disk-dir", str(directory), "--disk-capacity", "256MiB",
        "--segment-size", "1MiB", "--prefault", "false", *flags, **popen,
    )  # fmt: skip


def served(client, keys: list[bytes]) -> list[np.ndarray]:
    """Every block still served, a few keys at a time (a read pins its blocks in DRAM)."""
    out = []
    for i in range(0, len(keys), 4):
        out += client.get(keys[i : i + 4])
    return out


def assert_intact(client, keys: list[bytes], expected: list[np.ndarray]) -> int:
    """Each key is served with exactly its bytes, or not at all. Returns how many are served."""
    n = 0
    for key, want in zip(keys, expected, strict=True):
        got = client.get([key])
        if got:
            assert np.array_equal(got[0].view(np.uint8).ravel(), want.ravel()), key.hex()
            n += 1
    return n


def test_puts_through_a_small_host_tier_land_on_disk_and_read_back(tmp_path, blocks) -> None:
    keys = block_keys(np.arange(len(blocks) * 4), 4, b"demote")
    with disk_daemon(tmp_path) as d, d.client(transport="tcp") as c:
        assert c.put(keys, blocks).stored == len(blocks)  # 11.5 MiB through 2 MiB
        tiers = c.lookup_tiers(keys)
        assert len(tiers) == len(keys) and tiers[0] == "disk" and "host" in tiers
        got = served(c, keys)
        assert all(np.array_equal(g.ravel(), b) for g, b in zip(got, blocks, strict=True))
        host, disk = c.stats().tiers
        assert host.demotions >= len(keys) - 5 and host.evictions > 0
        assert disk.name == "disk" and disk.promotions > 0 and disk.errors == 0
        assert disk.blocks >= len(keys) - 5 and disk.capacity == 256 * MiB


def test_a_killed_daemon_restarts_serving_what_it_had_written(tmp_path, blocks) -> None:
    keys = block_keys(np.arange(len(blocks) * 4), 4, b"restart")
    with disk_daemon(tmp_path) as d, d.client(transport="tcp") as c:
        c.put(keys, blocks)
        d.process.kill()
        d.process.wait()
    with disk_daemon(tmp_path) as d, d.client(transport="grpc") as c:
        # at most the five blocks in DRAM were not yet written down
        assert c.lookup(keys) >= len(keys) - 5
        assert assert_intact(c, keys, blocks) >= len(keys) - 5


def test_persist_on_shutdown_keeps_what_was_only_in_dram(tmp_path, blocks) -> None:
    keys = block_keys(np.arange(16), 4, b"persist")
    for persist, expected in (("false", 0), ("true", 4)):
        flags = ("--dirty-ratio", "1", "--persist-on-shutdown", persist)
        with disk_daemon(tmp_path / persist, *flags) as d, d.client() as c:
            c.put(keys, blocks[:4])
            assert c.stats().tiers[1].blocks == 0  # under the dirty ratio: not written yet
        with disk_daemon(tmp_path / persist) as d, d.client() as c:
            assert c.lookup(keys) == expected
            assert assert_intact(c, keys, blocks[:4]) == expected


def test_kills_in_mid_write_never_leave_a_bad_block_served(tmp_path, blocks) -> None:
    """SIGKILL while blocks are being demoted, ten times over; then every block served is
    byte-identical, and every block that had left DRAM before the kill is still there."""
    written: dict[bytes, np.ndarray] = {}
    must_survive: list[bytes] = []
    for round in range(10):
        keys = block_keys(np.arange(48), 4, b"crash%d" % round)
        with disk_daemon(tmp_path, "--dirty-ratio", "0") as d, d.client(transport="tcp") as c:
            c.put(keys, blocks[:12])
            written.update(zip(keys, blocks[:12], strict=True))
            must_survive += keys[:7]  # 12 blocks through a 5-block host tier
            late = threading.Thread(target=_put_until_refused, args=(c, keys, blocks, round))
            late.start()
            d.process.kill()
            d.process.wait()
            late.join()
    with disk_daemon(tmp_path) as d, d.client() as c:
        keys = list(written)
        assert assert_intact(c, keys, list(written.values())) >= len(must_survive)
        assert all(c.lookup([key]) for key in must_survive)
        assert c.stats().tiers[1].errors == 0


def _put_until_refused(client, keys, blocks, round) -> None:
    """More puts racing the kill: these may or may not land, but never torn."""
    with contextlib.suppress(Exception):  # the daemon died under it: expected
        client.put(block_keys(np.arange(80), 4, b"late%d" % round), blocks[12:32])


def test_a_corrupted_segment_drops_that_block_and_serves_the_rest(tmp_path, blocks) -> None:
    keys = block_keys(np.arange(len(blocks) * 4), 4, b"corrupt")
    with disk_daemon(tmp_path) as d, d.client() as c:
        c.put(keys, blocks)
        assert c.lookup_tiers(keys[3:4]) == ["disk"]
        victim = bytes(blocks[3][:4096])
        for segment in tmp_path.glob("seg-*.kvs"):
            data = bytearray(segment.read_bytes())
            if (at := data.find(victim)) >= 0:
                data[at + 100_000] ^= 0xFF
                segment.write_bytes(data)
        got = c.get(keys[:8])
        assert len(got) == 3  # the prefix stops at the bad block
        disk = c.stats().tiers[1]
        assert disk.errors == 1 and "checksum" in disk.last_error
        assert c.lookup(keys[3:4]) == 0
        assert assert_intact(c, keys[4:], blocks[4:]) == len(keys) - 4


def test_a_full_disk_is_reported_and_the_daemon_keeps_serving(tmp_path, blocks) -> None:
    """Segment files may not pass 4 MiB (RLIMIT_FSIZE): writes beyond fail like a full disk."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * MiB, 4 * MiB))

    keys = block_keys(np.arange(len(blocks) * 4), 4, b"full")
    flags = ("--segment-size", "16MiB")
    with disk_daemon(tmp_path, *flags, preexec_fn=limit_file_size) as d, d.client() as c:
        assert c.put(keys, blocks).stored == len(keys)  # no put fails
        disk = c.stats().tiers[1]
        assert disk.errors > 0 and "too large" in disk.last_error
        assert assert_intact(c, keys, blocks) >= 10  # the first 4 MiB, and what is in DRAM
        fresh = block_keys(np.arange(4), 4, b"after")
        c.put(fresh, blocks[:1])
        assert np.array_equal(c.get(fresh)[0].view(np.uint8), blocks[0])


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
def test_a_durable_put_survives_a_crash_right_after_it(tmp_path, blocks, transport) -> None:
    """Nothing is written back on its own here (dirty ratio 1): only `durable` puts reach
    the disk before they are acknowledged."""
    keys = block_keys(np.arange(8 * 4), 4, f"durable/{transport}".encode())
    flags = ("--dirty-ratio", "1", "--host-capacity", "16MiB")
    with disk_daemon(tmp_path, *flags) as d, d.client(transport=transport) as c:
        assert c.put(keys[:4], blocks[:4], durable=True).stored == 4
        c.put(keys[4:], blocks[4:8])  # write-back: in DRAM only, for now
        d.process.send_signal(signal.SIGKILL)
        d.process.wait()
    with disk_daemon(tmp_path, *flags) as d, d.client() as c:
        assert c.lookup(keys) == 4  # the durable ones, and only those
        got = c.get(keys[:4])
        assert all(np.array_equal(g.view(np.uint8), b) for g, b in zip(got, blocks, strict=False))


def test_a_durable_put_needs_a_disk_tier(small_daemon) -> None:
    with small_daemon.client() as c, pytest.raises(Unsupported, match="need a disk tier"):
        c.put(block_keys(np.arange(4), 4, b"nodisk"), [b"x"], durable=True)
