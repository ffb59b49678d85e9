"""Malformed requests get a precise status naming the field, and harm nothing else."""

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import xxhash

from conftest import raw_channel, read_answer, send_request
from kvstore.errors import ResourceExhausted
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import INLINE, PUT
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
    assert "the 1 whole blocks before it are stored" in error.details()
    assert client.lookup(keys) == 1  # block 0 arrived whole: it stays, as the error says


@pytest.mark.parametrize("apart", [True, False], ids=["next-frame", "same-frame"])
def test_a_put_with_bytes_beyond_its_blocks_says_what_it_stored(
    channel, client, salt, witness, apart: bool
) -> None:
    keys = block_keys(np.arange(32), 16, salt)
    data = [b"a" * 10, b"b" * 10]
    frames = [headers((keys[0], 10), (keys[1], 10))]
    frames += [encode_data(data), encode_data([b"xy"])] if apart else [encode_data([*data, b"xy"])]
    error = put_raw(channel, frames)
    assert error.code() == INVALID and "2 bytes beyond the declared blocks" in error.details()
    if apart:  # the blocks were whole before the excess came: they stay, and it says so
        assert "the 2 whole blocks before it are stored" in error.details()
        assert client.lookup(keys) == 2
    else:  # refused before any of the frame was copied
        assert "stored" not in error.details() and client.lookup(keys) == 0


def test_a_refused_tcp_put_says_what_it_stored(daemon, client, salt, witness) -> None:
    keys = block_keys(np.arange(48), 16, salt)
    good = pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=4))
    with raw_channel(daemon.address) as sock:
        # bytes beyond the blocks: refused before any is read
        request = pb.BlockHeaders(blocks=[good])
        send_request(sock, PUT, request, flags=INLINE, data=b"good" + b"xy")
        error = read_answer(sock)
        assert error.kind == INVALID.value[0] and b"6 bytes follow" in error.meta
        assert client.lookup(keys[:1]) == 0
        # block 1 fails its checksum once block 0 arrived whole: block 0 stays, as it says
        good.meta.checksum = xxhash.xxh3_64_intdigest(b"good")
        bad = pb.BlockHeader(key=keys[1], meta=pb.BlockMeta(size=2, checksum=12345))
        request = pb.BlockHeaders(blocks=[good, bad])
        send_request(sock, PUT, request, flags=INLINE, data=b"good" + b"ok")
        error = read_answer(sock)
        assert error.kind == INVALID.value[0] and b"blocks[1].checksum" in error.meta
        assert b"the 1 whole blocks before it are stored" in error.meta
    assert client.lookup(keys[:2]) == 1


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
