"""Hand-encoded data frames must be exactly what protobuf would produce."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import FrameError, data_frames, decode_frame, encode_data


@given(st.lists(st.binary(max_size=300), max_size=5))
def test_data_frames_are_protobuf(pieces: list[bytes]) -> None:
    frame = encode_data([memoryview(p) for p in pieces])
    assert frame == pb.PutRequest(data=b"".join(pieces)).SerializeToString()
    assert pb.GetReply.FromString(frame).data == b"".join(pieces)
    decoded = decode_frame(frame, pb.GetReply)
    assert isinstance(decoded, memoryview) and decoded == b"".join(pieces)


def test_data_frame_decodes_without_copy() -> None:
    frame = encode_data([b"x" * 5000])
    view = decode_frame(frame, pb.PutRequest)
    assert view.obj is frame


def test_header_frames_go_through_protobuf() -> None:
    headers = pb.BlockHeaders(blocks=[pb.BlockHeader(key=bytes(16), meta=pb.BlockMeta(size=3))])
    frame = pb.PutRequest(headers=headers).SerializeToString()
    decoded = decode_frame(frame, pb.PutRequest)
    assert decoded.headers.blocks[0].meta.size == 3


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x12\x05abc", "malformed"),  # length past the end
        (b"\xff\xff\xff", "malformed"),
        (b"\x12\x01a\xf8\x01\x01", "unknown field number 31"),  # a data frame with a stranger
    ],
)
def test_bad_frames_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_frame(raw, pb.PutRequest)


def test_unknown_field_deep_inside_is_named() -> None:
    meta = pb.BlockMeta(size=1).SerializeToString() + b"\xa0\x06\x01"  # field 100
    header = b"\x0a\x10" + bytes(16) + b"\x12" + bytes([len(meta)]) + meta
    headers = b"\x0a" + bytes([len(header)]) + header
    frame = b"\x0a" + bytes([len(headers)]) + headers
    with pytest.raises(FrameError, match=r"headers\.blocks\[0\]\.meta: unknown field number 100"):
        decode_frame(frame, pb.PutRequest)


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=20), st.integers(64, 4096))
def test_frames_reassemble_and_keep_small_payloads_whole(sizes: list[int], chunk: int) -> None:
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    frames = list(data_frames([memoryview(p) for p in payloads], chunk))
    datas = [decode_frame(f, pb.GetReply) for f, _ in frames]
    assert b"".join(bytes(d) for d in datas) == b"".join(payloads)
    assert all(len(d) <= chunk for d in datas)
    assert sum(n for _, n in frames) == len(payloads)
    # a payload that fits in a frame is never cut across two
    starts = {0}
    for p in payloads:
        starts.add(max(starts) + len(p))
    edge = 0
    for d in datas:
        edge += len(d)
        assert edge in starts or len(d) == chunk
