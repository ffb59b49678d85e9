"""Same-host shared memory: how the arena reaches a client, leases, tampering, and what
dead or stopped clients leave."""

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from conftest import fake_node, running_daemon
from kvstore.client import Client
from kvstore.errors import CorruptBlock, InvalidArgument, LeaseExpired, Unsupported
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb

MiB = 1 << 20


@pytest.fixture
def short_ttl() -> Iterator:
    """Leases and reservations expire fast unless renewed; writers wait for room long."""
    with running_daemon(
        "--host-capacity", "16MiB", "--ticket-ttl", "1", "--reserve-timeout", "30"
    ) as d:
        yield d


def test_a_lease_is_zero_copy_and_pins_its_blocks(small_daemon) -> None:
    keys = block_keys(np.arange(20 * 16), 16, b"lease")
    with small_daemon.client(transport="shm") as client:
        client.put(keys[:10], [np.full(MiB, i, np.uint8) for i in range(10)])
        with client.lease(keys[:10]) as lease:
            assert [int(b[0]) for b in lease.blocks] == list(range(10))
            assert not lease.blocks[0].flags.writeable
            assert np.shares_memory(lease.blocks[0], client.shared_arena())
            for i in range(10, 20, 2):  # 10 MiB more through a 16 MiB tier with 10 pinned
                client.put(keys[i : i + 2], [np.full(MiB, i, np.uint8)] * 2)
            assert all((b == i).all() for i, b in enumerate(lease.blocks))
            assert client.lookup(keys[:10]) == 10
        with pytest.raises(LeaseExpired, match="released"):
            lease.blocks  # noqa: B018
        client.put(keys[10:12], [np.zeros(MiB, np.uint8)] * 2)  # released: evictable again
        assert client.stats().tiers[0].evictions > 0


def test_a_held_lease_is_renewed_while_its_holder_lives(short_ttl) -> None:
    """Held for many times its ttl while writers churn the tier: still its own bytes."""
    keys = block_keys(np.arange(64 * 16), 16, b"renewed")
    with short_ttl.client(transport="shm") as client:
        client.put(keys[:4], [np.full(MiB, i, np.uint8) for i in range(4)])
        with client.lease(keys[:4]) as lease:
            stop = lease.expires_at + 3  # the original expiry, and three ttls more
            for n in range(100_000):  # each put churns the free 12 MiB, until time has passed
                if lease.expires_at >= stop:
                    break
                client.put(keys[4 + n % 60 : 5 + n % 60], [np.full(4 * MiB, 99, np.uint8)])
            assert lease.expires_at >= stop  # renewed, more than once
            assert [int(b[0]) for b in lease.blocks] == [0, 1, 2, 3]
            assert all((b == n).all() for n, b in enumerate(lease.blocks))


def test_a_lease_whose_client_went_away_cannot_be_read(small_daemon) -> None:
    keys = block_keys(np.arange(16), 16, b"gone")
    client = small_daemon.client(transport="shm")
    client.put(keys, [b"x" * 100])
    lease = client.lease(keys)
    assert bytes(lease.blocks[0]) == b"x" * 100
    client.close()  # its connections close: the node releases the pins
    with pytest.raises(LeaseExpired):
        lease.blocks  # noqa: B018


def test_a_client_killed_holding_pins_leaves_them_to_the_node(short_ttl) -> None:
    keys = block_keys(np.arange(32), 16, b"killed-reader")
    with short_ttl.client() as client:
        client.put(keys[:1], [np.ones(12 * MiB, np.uint8)])
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sys
                from kvstore.client import Client
                client = Client({short_ttl.address!r}, transport="shm")
                lease = client.lease([{keys[0]!r}])
                print(len(lease.blocks), flush=True)
                sys.stdin.read()  # holds the lease until killed
            """)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout.readline().strip() == "1"  # pinned, in another process
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        finally:
            holder.kill()
        # 12 MiB more fit only once the dead client's pins are gone
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys[:1]) == 0


def test_a_stopped_client_loses_its_pins_at_expiry(short_ttl) -> None:
    """A holder that stops renewing (SIGSTOP) keeps its pins only until they expire."""
    keys = block_keys(np.arange(32), 16, b"stopped-reader")
    with short_ttl.client() as client:
        client.put(keys[:1], [np.ones(12 * MiB, np.uint8)])
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sys
                from kvstore.client import Client
                client = Client({short_ttl.address!r}, transport="shm")
                lease = client.lease([{keys[0]!r}])
                print(len(lease.blocks), flush=True)
                sys.stdin.read()
            """)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout.readline().strip() == "1"
            holder.send_signal(signal.SIGSTOP)  # alive, connected, renewing nothing
            assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        finally:
            holder.kill()
            holder.wait()


def test_tampering_with_the_arena_is_caught_on_every_path(small_daemon) -> None:
    """A process of the same user can write the mapped arena: the block's checksum (on by
    default) catches it wherever the block is read."""
    keys = block_keys(np.arange(16), 16, b"tamper")
    payload = np.arange(64 << 10, dtype=np.uint8)
    with small_daemon.client(transport="shm") as writer:
        writer.put(keys, [payload])
        with writer.lease(keys) as lease:
            at = lease.blocks[0].ctypes.data - writer.shared_arena().ctypes.data
        arena = writer.shared_arena()
        arena[at + 1000] ^= 0xFF  # a same-user process rewrites one byte of the block
        for transport in ("shm", "tcp", "grpc"):
            with (
                small_daemon.client(transport=transport) as reader,
                pytest.raises(CorruptBlock, match=f"block {keys[0].hex()}"),
            ):
                reader.get(keys)
        with pytest.raises(CorruptBlock):
            writer.lease(keys)
        with small_daemon.client(transport="tcp", checksum=False) as unchecked:
            assert unchecked.get(keys)[0][1000] != payload[1000]  # what checking prevents


def test_a_node_can_hand_over_only_its_own_memory(tmp_path) -> None:
    """A fake node hands a client a descriptor of an ordinary file as its "arena": the
    client refuses to map it and the file is never written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1024)
    fd = os.open(victim, os.O_RDWR)
    info = pb.NodeInfo(node_id=os.urandom(16).hex(), ticket=os.urandom(16), capacity=1 << 30)
    try:
        with (
            fake_node(info, unix_fd=fd) as address,
            Client(address, transport="shm") as client,
            pytest.raises(Unsupported, match="not its arena"),
        ):
            client.put(block_keys(np.arange(16), 16, b"x"), [b"overwrite"])
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"precious" * 1024


def test_a_dead_writer_leaves_no_reservation(short_ttl) -> None:
    keys = block_keys(np.arange(32), 16, b"dead-writer")
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import numpy as np
            from kvstore.client import Client
            client = Client({short_ttl.address!r}, transport="shm")
            def fill(indexes, slots):
                print(len(slots), flush=True)
                input()  # dies with 12 MiB of slots reserved and unwritten
            client.put_in_place([{keys[0]!r}], np.uint8, ({12 * MiB},), fill)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "1"
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
    with short_ttl.client() as client:
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys[:1]) == 0


def test_put_in_place_lets_the_caller_write_the_slots(daemon, kv_sample) -> None:
    blocks = [np.ascontiguousarray(b) for b in kv_sample[:64].reshape(4, 16, -1)]
    keys = block_keys(np.arange(64), 16, b"in-place")
    written: list[int] = []

    def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
        for i, slot in zip(indexes, slots, strict=True):
            slot[:] = blocks[i].reshape(-1).view(np.uint8)
            written.append(i)

    with daemon.client(transport="shm") as c:
        c.put(keys[1:2], blocks[1:2])
        result = c.put_in_place(keys, blocks[0].dtype, blocks[0].shape, fill)
        assert (result.stored, result.existed) == (3, 1) and written == [0, 2, 3]
        got = c.get(keys)
        assert all(np.array_equal(g, b) for g, b in zip(got, blocks, strict=True))
        with c.lease(keys[2:3]) as lease:  # the node hashed the slots as they were written
            at = lease.blocks[0].ctypes.data - c.shared_arena().ctypes.data
        c.shared_arena()[at] ^= 0xFF
        with pytest.raises(CorruptBlock, match=keys[2].hex()):
            c.get(keys)
    with daemon.client(transport="tcp") as c, pytest.raises(Unsupported):
        c.put_in_place(keys, np.uint8, (1,), fill)


def test_an_in_place_fill_may_finish_its_copies_later(daemon, kv_sample, monkeypatch) -> None:
    """fill returns a wait; each part is published only after its wait has run."""
    from kvstore.client import client as client_module

    monkeypatch.setattr(client_module, "IN_PLACE_PART", 1)  # one block per part
    blocks = [np.ascontiguousarray(b) for b in kv_sample[:64].reshape(4, 16, -1)]
    keys = block_keys(np.arange(64), 16, b"in-place-later")
    waited: list[int] = []

    def fill(indexes: list[int], slots: list[np.ndarray]):
        def wait() -> None:  # the copy happens here, as a GPU's would complete
            for i, slot in zip(indexes, slots, strict=True):
                slot[:] = blocks[i].reshape(-1).view(np.uint8)
                waited.append(i)

        return wait

    with daemon.client(transport="shm") as c:
        result = c.put_in_place(keys, blocks[0].dtype, blocks[0].shape, fill)
        assert result.stored == 4 and waited == [0, 1, 2, 3]
        assert all(np.array_equal(g, b) for g, b in zip(c.get(keys), blocks, strict=True))


def test_released_pins_ride_with_the_next_request(small_daemon) -> None:
    """A get's pins end without a round trip of their own: the next request carries the
    release, so a put that needs the room finds it."""
    keys = block_keys(np.arange(32), 16, b"ride")
    with small_daemon.client(transport="shm") as client:
        client.put(keys[:1], [np.ones(12 * MiB, np.uint8)])
        assert client.get(keys[:1])[0].nbytes == 12 * MiB
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1


def test_an_in_place_commit_is_hashed_by_the_node_or_checked_never_both() -> None:
    """Checksums sent with a commit the node is to hash would be stored unchecked: refused,
    and the slots freed; hashed by the node, the block carries its own bytes' checksum."""
    from kvstore.ingest import SlotPut
    from kvstore.meta import BlockMeta
    from kvstore.store import Store
    from kvstore.tiers.host import HostTier

    store = Store([HostTier(3 * MiB // 2, prefault=False)], max_block_size=MiB, reserve_timeout=1)
    key = block_keys(np.arange(16), 16, b"hash-here")[0]
    put = SlotPut(store, [(key, BlockMeta(MiB, "uint8", (MiB,)))])
    with pytest.raises(InvalidArgument, match="the node is to hash"):
        put.commit([1], unhashed=True)
    put = SlotPut(store, [(key, BlockMeta(MiB, "uint8", (MiB,)))])  # the first slot was freed
    np.frombuffer(put.slots[0][3].view, np.uint8)[:] = 7
    assert put.commit(unhashed=True).stored == 1
    with store.read([key]) as found:
        block = found.blocks[0]
        assert block.meta.checksum == xxhash.xxh3_64_intdigest(bytes([7]) * MiB)
