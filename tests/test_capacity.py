"""A full host tier: LRU eviction, and readers that are never robbed."""

import threading

import grpc
import numpy as np
import pytest

from kvstore.errors import ResourceExhausted
from kvstore.keys import block_keys
from kvstore.limits import MAX_WAITING
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import decode_frame

MiB = 1 << 20


def blocks(n: int, size: int = MiB) -> list[np.ndarray]:
    return [np.full(size, i, np.uint8) for i in range(n)]


def test_lru_evicts_the_oldest_blocks_when_full(small_daemon) -> None:
    with small_daemon.client() as client:
        keys = block_keys(np.arange(24 * 16), 16, b"lru")
        assert client.put(keys[:12], blocks(12)).stored == 12
        client.get(keys[:2])  # reading blocks 0-1 makes them the warmest
        assert client.put(keys[12:24], blocks(12)).stored == 12  # 24 MiB through 16 MiB
        assert client.lookup(keys[:2]) == 2
        assert client.lookup(keys[2:3]) == 0
        host = client.stats().tiers[0]
        assert host.evictions >= 8 and host.blocks <= 16


def test_a_slow_reader_gets_intact_bytes_while_writers_churn_the_tier(small_daemon) -> None:
    """Pinning itself is tested on the tier; here: whatever the timing, no torn bytes."""
    with (
        small_daemon.client() as reader,
        small_daemon.client() as writer,
        grpc.insecure_channel(small_daemon.address) as channel,
    ):
        keys = block_keys(np.arange(40 * 16), 16, b"pin")
        payloads = blocks(12)
        reader.put(keys[:12], payloads)
        stream = channel.unary_stream("/kvstore.v1.KVStore/Get")(
            pb.GetRequest(keys=keys[:12]).SerializeToString()
        )
        assert pb.GetReply.FromString(next(stream)).headers.blocks[11].meta.size == MiB
        for i in range(12, 40, 2):  # 28 MiB more through a 16 MiB tier
            writer.put(keys[i : i + 2], blocks(2))
        received = np.concatenate([decode_frame(f, pb.GetReply) for f in stream])
        assert np.array_equal(received, np.concatenate(payloads))
        assert writer.stats().tiers[0].evictions >= 20


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_puts_waiting_for_room_never_take_every_thread(small_daemon, transport) -> None:
    """The tier is full of pinned blocks; 40 puts that need room: a few wait, the rest are
    refused at once, and the node answers Stats and Lookup all the while."""
    keys = block_keys(np.arange(48 * 16), 16, f"waiting/{transport}".encode())
    outcomes: list[str] = []
    with small_daemon.client(transport="shm") as holder:
        holder.put(keys[:1], [np.ones(15 * MiB, np.uint8)])
        with holder.lease(keys[:1]):

            def put(i: int) -> None:
                with small_daemon.client(transport=transport) as client:
                    try:
                        client.put(keys[i : i + 1], [np.zeros(4 * MiB, np.uint8)])
                        outcomes.append("stored")
                    except ResourceExhausted as exc:
                        outcomes.append("waited" if "within" in str(exc) else "refused")

            puts = [threading.Thread(target=put, args=(i,)) for i in range(1, 41)]
            for thread in puts:
                thread.start()
            with small_daemon.client(timeout=10) as watcher:
                assert watcher.stats().tiers[0].blocks >= 1
                assert watcher.lookup(keys[:1]) == 1
            for thread in puts:
                thread.join(timeout=60)
    assert len(outcomes) == 40 and "stored" not in outcomes
    assert outcomes.count("waited") <= MAX_WAITING < outcomes.count("refused")
