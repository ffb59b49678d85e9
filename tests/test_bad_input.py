"""Malformed requests get a precise status naming the field, and harm nothing else."""

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from kvstore.errors import ResourceExhausted
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import encode_data

SERVICE = "/kvstore.v1.KVStore/"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def channel(daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.address) as ch:
        yield ch


@pytest.fixture
def witness(client, salt):
    """A block stored before the bad request, checked after it."""
    key = block_keys(np.arange(16), 16, salt + b"witness")
    client.put(key, [b"still here"])
    yield key
    assert [bytes(b) for b in client.get(key)] == [b"still here"]
    probe = block_keys(np.arange(16), 16, salt + b"probe")
    assert client.put(probe, [b"ok"]).stored == 1  # and the daemon still takes puts


def headers(*blocks: tuple[bytes, int], **meta) -> bytes:
    declared = [pb.BlockHeader(key=k, meta=pb.BlockMeta(size=n, **meta)) for k, n in blocks]
    return pb.PutRequest(headers=pb.BlockHeaders(blocks=declared)).SerializeToString()


def put_raw(channel: grpc.Channel, frames: list[bytes]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.stream_unary(SERVICE + "Put")(iter(frames), timeout=30)
    return info.value


K1, K2 = bytes(range(16)), bytes(range(1, 17))


@pytest.mark.parametrize(
    ("frames", "code", "message"),
    [
        ([headers((b"short", 1)), encode_data([b"x"])], INVALID, "blocks[0].key: must be 16 bytes"),
        (
            [headers((K1, 3)), encode_data([b"x"])],
            INVALID,
            "blocks[0].size: stream ended after 1 of 3",
        ),
        ([headers((K1, 1)), encode_data([b"xy"])], INVALID, "data: 1 bytes beyond the declared"),
        ([encode_data([b"xy"])], INVALID, "data: 2 bytes beyond the declared"),
        ([headers((K1, 1), (K1, 1)), encode_data([b"xy"])], INVALID, "blocks[1].key: repeats"),
        ([headers((K1, 1)), headers((K1, 1))], INVALID, "blocks[1].key: repeats"),
        ([headers((K1, 0))], INVALID, "blocks[0].size: must be 1.."),
        ([headers((K1, 1), codec="zip9")], INVALID, "blocks[0].codec: unknown codec 'zip9'"),
        ([headers((K1, 1), dtype="x" * 100)], INVALID, "blocks[0].dtype: longer than"),
        ([], INVALID, "blocks: empty batch"),
        ([pb.PutRequest().SerializeToString()], INVALID, "frame: PutRequest sets neither"),
        ([b"\x0a\x03\xff\xff\xff"], INVALID, "malformed PutRequest"),
        ([headers((K1, 1)) + b"\xa0\x06\x01"], INVALID, "PutRequest: unknown field number 100"),
        ([headers((K1, 257 << 20))], INVALID, "blocks[0].size: must be 1..268435456"),
    ],
)
def test_bad_put(channel, witness, frames: list[bytes], code, message: str) -> None:
    error = put_raw(channel, frames)
    assert error.code() == code
    assert message in error.details()


def test_a_broken_put_leaves_no_partial_block(channel, client, salt, witness) -> None:
    keys = block_keys(np.arange(48), 16, salt)
    frames = [
        headers((keys[0], 10), (keys[1], 10), (keys[2], 10)),
        encode_data([b"a" * 10, b"b" * 4]),
    ]
    error = put_raw(channel, frames)  # ends 6 bytes into block 1
    assert error.code() == INVALID
    assert client.lookup(keys) == 1  # block 0 arrived whole; block 1 was never published
    assert [bytes(b) for b in client.get(keys)] == [b"a" * 10]


def test_a_cancelled_put_leaves_no_partial_block(channel, client, salt, witness) -> None:
    keys = block_keys(np.arange(32), 16, salt)
    sent_first = []

    def frames():
        yield headers((keys[0], 1 << 20), (keys[1], 1 << 20))
        yield encode_data([b"a" * (1 << 20)])
        yield encode_data([b"b" * 1000])
        sent_first.append(True)
        raise RuntimeError("producer died mid-block")  # the client cancels the stream

    with pytest.raises(grpc.RpcError) as info:
        channel.stream_unary(SERVICE + "Put")(frames(), timeout=30)
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert sent_first
    assert client.lookup(keys[1:]) == 0


@pytest.mark.parametrize(
    ("method", "request_bytes", "message"),
    [
        ("Get", pb.GetRequest().SerializeToString(), "keys: must not be empty"),
        (
            "Get",
            pb.GetRequest(keys=[K1, b"x" * 17]).SerializeToString(),
            "keys[1]: must be 16 bytes",
        ),
        ("Lookup", pb.LookupRequest().SerializeToString(), "query: LookupRequest sets neither"),
        (
            "Lookup",
            pb.LookupRequest(keys=pb.GetRequest(keys=[b"k"])).SerializeToString(),
            "keys.keys[0]: must be 16 bytes",
        ),
        (
            "Lookup",
            pb.LookupRequest(tokens=pb.TokenPrefix(token_ids=[1])).SerializeToString(),
            "tokens.block_size: must be >= 1",
        ),
        ("Delete", pb.DeleteRequest().SerializeToString(), "keys: must not be empty"),
        ("Stats", b"\x08\x01", "StatsRequest: unknown field number 1"),
    ],
)
def test_bad_unary_and_get_requests(
    channel, witness, method: str, request_bytes: bytes, message: str
) -> None:
    call = (channel.unary_stream if method == "Get" else channel.unary_unary)(SERVICE + method)
    with pytest.raises(grpc.RpcError) as info:
        result = call(request_bytes, timeout=30)
        list(result) if method == "Get" else result
    assert info.value.code() == INVALID
    assert message in info.value.details()


def test_block_larger_than_the_whole_tier(small_daemon) -> None:
    with small_daemon.client() as client:
        keys = block_keys(np.arange(16), 16, b"big")
        with pytest.raises(ResourceExhausted, match="more than its capacity"):
            client.put(keys, [np.zeros(17 << 20, np.uint8)])
        assert client.put(keys, [b"small"]).stored == 1
