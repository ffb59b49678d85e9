"""Same-host shared memory: proof of sharing the host, leases, and what dead clients leave."""

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from conftest import raw_call, running_daemon
from kvstore.client.shm import SharedSegment
from kvstore.errors import Unsupported
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb

MiB = 1 << 20


@pytest.fixture
def short_ttl() -> Iterator:
    """Tickets expire fast; writers wait long enough for the sweeper to free space."""
    with running_daemon(
        "--host-capacity", "16MiB", "--ticket-ttl", "0.3", "--reserve-timeout", "30"
    ) as d:
        yield d


def test_a_lease_is_zero_copy_and_pins_its_blocks(small_daemon) -> None:
    keys = block_keys(np.arange(20 * 16), 16, b"lease")
    with small_daemon.client(transport="shm") as client:
        client.put(keys[:10], [np.full(MiB, i, np.uint8) for i in range(10)])
        with client.lease(keys[:10]) as lease:
            assert [int(b[0]) for b in lease.blocks] == list(range(10))
            assert not lease.blocks[0].flags.writeable
            for i in range(10, 20, 2):  # 10 MiB more through a 16 MiB tier with 10 pinned
                client.put(keys[i : i + 2], [np.full(MiB, i, np.uint8)] * 2)
            assert all((b == i).all() for i, b in enumerate(lease.blocks))
            assert client.lookup(keys[:10]) == 10
        client.put(keys[10:12], [np.zeros(MiB, np.uint8)] * 2)  # released: evictable again
        assert client.stats().tiers[0].evictions > 0


def test_the_client_proves_it_shares_the_host(small_daemon) -> None:
    info = pb.SegmentInfo.FromString(raw_call(small_daemon.address, "Segment", pb.StatsRequest()))
    assert SharedSegment(info).memory.size == info.size + 4096
    with pytest.raises(Unsupported, match="another token"):
        SharedSegment(pb.SegmentInfo(path=info.path, token=b"x" * 16, size=info.size))
    with pytest.raises(Unsupported, match="cannot open"):
        SharedSegment(pb.SegmentInfo(path="/proc/1/fd/999999", token=info.token))


def test_a_client_that_dies_holding_reservations_leaks_nothing(short_ttl) -> None:
    keys = block_keys(np.arange(32), 16, b"dead-writer")
    request = pb.OpenPutRequest(
        shared_memory=True, blocks=[pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=12 * MiB))]
    )
    ticket = pb.Ticket.FromString(raw_call(short_ttl.address, "OpenPut", request))
    assert len(ticket.offsets) == 1  # 12 MiB reserved; the writer never finishes
    with short_ttl.client() as client:  # waits for the expiry to free the slot
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        assert client.lookup(keys[:1]) == 0


def test_a_client_that_dies_holding_a_lease_leaks_nothing(short_ttl) -> None:
    keys = block_keys(np.arange(32), 16, b"dead-reader")
    with short_ttl.client() as client:
        client.put(keys[:1], [np.ones(12 * MiB, np.uint8)])
        request = pb.OpenGetRequest(keys=keys[:1], shared_memory=True)
        ticket = pb.Ticket.FromString(raw_call(short_ttl.address, "OpenGet", request))
        assert ticket.offsets  # pinned; the reader never releases
        assert client.put(keys[1:], [np.zeros(12 * MiB, np.uint8)]).stored == 1
        with pytest.raises(grpc.RpcError) as info:  # the lease is gone
            raw_call(short_ttl.address, "Finish", pb.FinishRequest(ticket=ticket.id))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_shared_memory_put_is_checked_and_finished_once(small_daemon) -> None:
    keys = block_keys(np.arange(32), 16, b"shm-check")
    with small_daemon.client(transport="shm") as client:
        request = pb.OpenPutRequest(
            shared_memory=True,
            blocks=[pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=4, checksum=1))],
        )
        ticket = pb.Ticket.FromString(raw_call(small_daemon.address, "OpenPut", request))
        finish = pb.FinishRequest(ticket=ticket.id)
        with pytest.raises(grpc.RpcError) as info:
            raw_call(small_daemon.address, "Finish", finish)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "blocks[0].checksum" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            raw_call(small_daemon.address, "Finish", finish)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "already used" in info.value.details()
        assert client.lookup(keys[:1]) == 0
        assert client.put(keys[1:], [b"fine"]).stored == 1


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
