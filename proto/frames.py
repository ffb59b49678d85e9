"""Data frames encoded and decoded by hand, byte-identical to protobuf.

`PutRequest` and `GetReply` are `oneof frame { BlockHeaders headers = 1; bytes
data = 2; }`. Protobuf would copy a payload twice more per hop (into a message,
then into its serialized form, and back on the other side); these helpers
write a data frame's tag and length before the payload views in one join
(one copy) and decode it as a zero-copy view of the received bytes. Header
frames go through protobuf as usual.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

DATA_TAG = b"\x12"  # field 2, wire type 2 (length-delimited)

M = TypeVar("M", bound=Message)


class FrameError(ValueError):
    """A frame that is not valid protobuf, or carries fields this version does not know."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_data(views: Sequence[memoryview | bytes]) -> bytes:
    """One data frame holding `views` back to back (one copy of the payload)."""
    return b"".join([DATA_TAG, _varint(sum(len(v) for v in views)), *views])


def data_frames(payloads: Sequence[memoryview], chunk_size: int) -> Iterator[tuple[bytes, int]]:
    """Cut the concatenation of `payloads` into data frames of at most `chunk_size`.

    Yields (frame, n): n payloads ended in this frame, so their sources may be
    released once it is built. A frame holds whole payloads where they fit, so a
    receiver can use each of them as a view of the frame, without a copy.
    """
    pieces: list[memoryview] = []
    room, ended = chunk_size, 0
    for payload in payloads:
        if len(payload) > room and pieces:
            yield encode_data(pieces), ended
            pieces, room, ended = [], chunk_size, 0
        while len(payload) > room:  # larger than a frame: it ends a frame of its own
            yield encode_data([payload[:room]]), 0
            payload, room = payload[room:], chunk_size
        pieces.append(payload)
        room -= len(payload)
        ended += 1
    if pieces:
        yield encode_data(pieces), ended


def _data_view(raw: bytes) -> memoryview | None:
    """The payload of `raw` if it is exactly one data frame, else None."""
    if raw[:1] != DATA_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(raw) and pos < 11:
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return memoryview(raw)[pos:] if length == len(raw) - pos else None
        shift += 7
    return None


def decode_frame(raw: bytes, message_type: type[M]) -> M | memoryview:
    """A data frame's payload as a view into `raw`, or any other frame parsed strictly."""
    data = _data_view(raw)
    if data is not None:
        return data
    try:
        message = message_type.FromString(raw)
    except DecodeError as exc:
        raise FrameError(f"malformed {message_type.__name__}: {exc}") from None
    reject_unknown(message)
    return message


def parse(raw: bytes, message_type: type[M]) -> M:
    """A message parsed strictly: malformed bytes or unknown fields are a FrameError."""
    try:
        message = message_type.FromString(raw)
    except Exception as exc:  # DecodeError, or a RuntimeError from a malformed nested field
        raise FrameError(f"malformed {message_type.__name__}: {exc}") from None
    reject_unknown(message)
    return message


def reject_unknown(message: Message, path: str = "") -> None:
    """Raise FrameError naming the first field this contract does not define."""
    name = path or type(message).__name__
    unknown = UnknownFieldSet(message)
    if len(unknown):
        raise FrameError(f"{name}: unknown field number {unknown[0].field_number}")
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.is_repeated:
            for i, item in enumerate(value):
                reject_unknown(item, f"{name}.{descriptor.name}[{i}]")
        else:
            reject_unknown(value, f"{name}.{descriptor.name}")
