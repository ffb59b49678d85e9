"""A full host tier: LRU eviction, and readers that are never robbed."""

import grpc
import numpy as np

from kvstore.keys import block_keys
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
