"""Requests that would cost the daemon far more than the caller: refused, by name, at once."""

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from conftest import running_daemon
from kvstore.errors import InvalidArgument, ResourceExhausted
from kvstore.keys import block_keys
from kvstore.limits import BLOCK_OVERHEAD, MAX_BLOCKS, MAX_HEADER_FRAME, MAX_RANK, MAX_TOKENS
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import encode_data

SERVICE = "/kvstore.v1.KVStore/"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
KEYS = [i.to_bytes(16, "big") for i in range(MAX_BLOCKS + 1)]


@pytest.fixture
def channel(daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.address) as ch:
        yield ch


def status(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=30)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def put_frames(*blocks: pb.BlockHeader) -> list[bytes]:
    return [pb.PutRequest(headers=pb.BlockHeaders(blocks=blocks)).SerializeToString()]


def test_a_get_naming_a_key_twice_is_refused(channel, client, salt) -> None:
    key = block_keys(np.arange(16), 16, salt)
    client.put(key, [b"x" * 1000])
    request = pb.GetRequest(keys=key * 10_000).SerializeToString()
    error = status(channel.unary_stream(SERVICE + "Get"), request)
    assert error.code() == INVALID and "keys[1]: repeats keys[0]" in error.details()
    with pytest.raises(InvalidArgument, match=r"keys\[1\]: repeats"):
        client.get(key * 2)


@pytest.mark.parametrize("method", ["Get", "Lookup", "Delete"])
def test_too_many_keys_in_one_request(channel, method: str) -> None:
    request = {
        "Get": pb.GetRequest(keys=KEYS),
        "Lookup": pb.LookupRequest(keys=pb.GetRequest(keys=KEYS)),
        "Delete": pb.DeleteRequest(keys=KEYS),
    }[method].SerializeToString()
    kind = channel.unary_stream if method == "Get" else channel.unary_unary
    error = status(kind(SERVICE + method), request)
    assert error.code() == INVALID and f"at most {MAX_BLOCKS} per request" in error.details()


def test_a_put_declaring_too_many_blocks_is_refused(channel) -> None:
    half = MAX_BLOCKS // 2 + 1
    frames = [
        *put_frames(*(pb.BlockHeader(key=k, meta=pb.BlockMeta(size=1)) for k in KEYS[:half])),
        *put_frames(*(pb.BlockHeader(key=k, meta=pb.BlockMeta(size=1)) for k in KEYS[half:])),
    ]
    error = status(channel.stream_unary(SERVICE + "Put"), iter(frames))
    assert error.code() == INVALID and f"more than {MAX_BLOCKS} blocks" in error.details()


def test_a_huge_header_frame_is_refused_unparsed(channel) -> None:
    meta = pb.BlockMeta(size=1, layout="x" * 60)
    frame = put_frames(*(pb.BlockHeader(key=k, meta=meta) for k in KEYS[: MAX_BLOCKS // 2]))
    frame = [frame[0] * (MAX_HEADER_FRAME // len(frame[0]) + 1)]  # still valid protobuf
    error = status(channel.stream_unary(SERVICE + "Put"), iter(frame))
    assert error.code() == INVALID and f"at most {MAX_HEADER_FRAME}" in error.details()


def test_metadata_of_a_block_is_bounded(channel) -> None:
    meta = pb.BlockMeta(size=1, shape=[1] * (MAX_RANK + 1))
    frames = [*put_frames(pb.BlockHeader(key=KEYS[0], meta=meta)), encode_data([b"x"])]
    error = status(channel.stream_unary(SERVICE + "Put"), iter(frames))
    assert error.code() == INVALID
    assert f"blocks[0].shape: {MAX_RANK + 1} dimensions: at most {MAX_RANK}" in error.details()


def test_a_lookup_of_too_many_tokens_is_refused(channel, client) -> None:
    lookup = channel.unary_unary(SERVICE + "Lookup")
    many = pb.TokenPrefix(token_ids=np.zeros(MAX_TOKENS + 1, np.uint32), block_size=256)
    error = status(lookup, pb.LookupRequest(tokens=many).SerializeToString())
    assert error.code() == INVALID and f"at most {MAX_TOKENS}" in error.details()
    tiny = pb.TokenPrefix(token_ids=np.zeros(MAX_BLOCKS + 1, np.uint32), block_size=1)
    error = status(lookup, pb.LookupRequest(tokens=tiny).SerializeToString())
    assert error.code() == INVALID and "tokens.block_size" in error.details()
    with pytest.raises(InvalidArgument, match="token_ids: must fit in uint32"):
        client.lookup_tokens([5, -1], 1, b"salt")
    with pytest.raises(InvalidArgument, match="token_ids: must be integers"):
        client.lookup_tokens([0.5], 1, b"salt")


@pytest.mark.parametrize(
    "payload",
    [
        np.array([object()], dtype=object),
        np.zeros(2, dtype=[("a", "<i4")]),
        np.zeros(2, dtype="V8"),
        np.zeros(2, dtype="U4"),
    ],
    ids=["object", "structured", "void", "unicode"],
)
def test_payloads_of_no_plain_dtype_are_refused_at_put(client, salt, payload) -> None:
    key = block_keys(np.arange(16), 16, salt)
    with pytest.raises(InvalidArgument, match=r"payloads\[0\]: dtype .* not a plain numeric"):
        client.put(key, [payload])
    assert client.lookup(key) == 0


@pytest.fixture(scope="module")
def tiny_blocks_daemon():
    with running_daemon("--host-capacity", "256MiB", "--prefault", "false") as d:
        yield d


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
def test_small_blocks_are_accounted_in_the_slots_they_take(tiny_blocks_daemon, transport) -> None:
    keys = block_keys(np.arange(70_000), 1, transport.encode())
    with tiny_blocks_daemon.client(transport=transport) as client:
        before = client.stats().tiers[0]
        assert client.put(keys[:1000], [b"s" * 64] * 1000).stored == 1000
        host = client.stats().tiers[0]
        assert host.blocks - before.blocks == 1000
        assert host.bytes - before.bytes == 1000 * (4096 + BLOCK_OVERHEAD)
        assert host.payload_bytes - before.payload_bytes == 1000 * 64
        with pytest.raises(ResourceExhausted, match="more than its capacity of 268435456"):
            client.put(keys, [b"s" * 64] * len(keys))  # 70,000 slots: more than the tier
        assert client.lookup(keys[:1000]) == 1000  # nothing was evicted by the refused put
        assert client.lookup(keys[1000:1001]) == 0


def test_a_batch_over_capacity_is_refused_by_the_node(tiny_blocks_daemon) -> None:
    """What the client checks first, the node checks too."""
    keys = block_keys(np.arange(MAX_BLOCKS), 1, b"node-side")
    meta = pb.BlockMeta(size=16 << 10)  # 16,384 blocks of 16 KiB: 264 MiB of slots
    frames = put_frames(*(pb.BlockHeader(key=k, meta=meta) for k in keys))
    with grpc.insecure_channel(tiny_blocks_daemon.address) as channel:
        error = status(channel.stream_unary(SERVICE + "Put"), iter(frames))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than its capacity of 268435456" in error.details()
