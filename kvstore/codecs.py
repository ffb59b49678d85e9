"""Payload codecs: chosen by the producer, named in each block's metadata, undone by the
consumer. Nodes never decode; they store and send encoded bytes.

Lossless: `none`, `lz4`, `zstd`, `shuffle-lz4`, `shuffle-zstd` (2-byte values split
into a high-byte and a low-byte plane first) and `split-zstd`, the best for 16-bit
float KV: the exponents are entropy-coded and the mantissa bits (noise) go raw. For
bfloat16, each exponent becomes a nibble relative to its channel's mean, two to a
byte through zstd; for float16, the nibble, the sign and the top two mantissa bits make
one byte, through zstd channel-major, channels ordered by how settled their sign is.
`split` (bfloat16) sends the nibbles without zstd: a lower ratio at half the cost, for
links almost as fast as the cores.

`auto` (client side only) picks, per link speed, the lossless codec that delivers
raw KV fastest, timed on the first block of each kind the client puts (`choose`).

Lossy, opt-in, for float KV: `int8` (one rounding step per layer and half, keys and
values, sized for a set error; a zero point per channel; entropy-coded when stacked
with zstd), `int4` (symmetric, 7 levels, two codes a byte: keys get one scale per
channel across the block's tokens, values one per token and head, the layouts where
each has its outliers) and `fp8` (e4m3 with a scale per token and head). Each can be
stacked with zstd: `int8+zstd`, `int4+zstd`, `fp8+zstd`. Error bounds: see
`LOSSY_BOUNDS`.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import numpy as np
import zstandard

from kvstore.errors import InvalidArgument

FLOATS = ("float16", "bfloat16", "float32", "float64")
LOSSY_BOUNDS = {"int8": 0.01, "fp8": 0.05, "int4": 0.25}
"""Mean relative error (||x - x'|| / ||x||) per block on real KV, enforced by tests."""

Buffer = bytes | np.ndarray  # an encoded payload: bytes, or a flat uint8 array
_local = threading.local()  # zstd contexts are reused, one per thread (they are not shared)


@dataclass(frozen=True)
class Codec:
    name: str
    lossy: bool
    pack: Callable[[np.ndarray, str], Buffer]  # (array, layout) -> payload
    unpack: Callable[[memoryview, np.dtype, tuple[int, ...], str], np.ndarray]
    dtypes: tuple[str, ...] = ()  # the names of what it encodes; empty: anything
    bound: Callable[[tuple[int, ...], str], int] | None = None
    """The most bytes its payload takes for an array of this shape and layout (what
    zstd stacked on it may decompress to at most); None: not stackable."""

    def check(self, dtype: np.dtype) -> None:
        """Refuse, with the reason, an array this codec cannot encode."""
        if self.dtypes and dtype not in self.dtypes:
            *head, last = [str(d) for d in self.dtypes]
            wanted = f"{', '.join(head)} or {last}" if head else last
            raise InvalidArgument("codec", f"{self.name} needs {wanted}, got {dtype}")

    def encode(self, array: np.ndarray, layout: str) -> Buffer:
        self.check(array.dtype)
        return self.pack(array, layout)

    def decode(
        self,
        payload: memoryview,
        dtype: np.dtype,
        shape: tuple[int, ...],
        layout: str,
        raw_size: int | None = None,
    ) -> np.ndarray:
        """The array of `dtype` and `shape` that `payload` encodes; `raw_size` (what the
        block's metadata declares) must be its size in bytes. Nothing decodes to more
        than that size: a payload that would, or that does not decode to exactly that
        array, raises InvalidArgument before any large allocation."""
        size = math.prod(shape) * dtype.itemsize
        if raw_size is not None and raw_size != size:
            raise InvalidArgument(
                "raw_size", f"{raw_size} bytes declared for {dtype_name(dtype)} {shape} ({size})"
            )
        try:
            array = self.unpack(payload, dtype, shape, layout)
        except InvalidArgument:
            raise
        except (ValueError, TypeError, IndexError, struct.error, zstandard.ZstdError) as exc:
            raise InvalidArgument("payload", f"not a {self.name} payload: {exc}") from None
        if array.shape != tuple(shape) or array.dtype != dtype:  # never, for a sound codec
            raise InvalidArgument("payload", f"{self.name} payload decoded to {array.shape}")
        return array


def dtype_name(dtype: np.dtype) -> str:
    """How metadata names a dtype: numpy's string, or the name of an extension type."""
    return dtype.name if dtype.kind == "V" else dtype.str


def parse_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        return ml_dtype(name)
    except TypeError:
        return None


def ml_dtype(name: str) -> np.dtype:
    """A type numpy knows through ml_dtypes (bfloat16, float8_e4m3fn): imported on first
    need, as it takes ~0.4 s, which a client that never meets these types never pays."""
    import ml_dtypes  # noqa: F401  (registers its types with numpy by name)

    return np.dtype(name)


def __getattr__(name: str) -> np.dtype:
    """`BFLOAT16`, resolved on first use as `ml_dtype` is."""
    if name == "BFLOAT16":
        return ml_dtype("bfloat16")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- byte codecs ---------------------------------------------------------------------


def _zstd(data: Buffer) -> bytes:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=1, write_checksum=False)
    return _local.c.compress(data)


def _unzstd(data: memoryview | bytes, limit: int, exact: bool = True) -> bytes:
    """One zstd frame, decompressed to exactly `limit` bytes (at most, unless `exact`).
    The size a frame declares is checked first: zstandard allocates it, whatever the
    bound, and a small frame may declare (and hold) gigabytes."""
    if not hasattr(_local, "d"):
        _local.d = zstandard.ZstdDecompressor()
    declared = zstandard.frame_content_size(data)  # -1: not declared
    if declared > limit or (exact and declared not in (-1, limit)):
        raise InvalidArgument("payload", f"zstd frame of {declared} bytes where {limit} fit")
    raw = _local.d.decompress(data, max_output_size=limit, allow_extra_data=False)
    if len(raw) > limit or (exact and len(raw) != limit):
        raise InvalidArgument("payload", f"zstd frame of {len(raw)} bytes where {limit} fit")
    return raw


def _lz4(data: memoryview | bytes) -> bytes:
    return lz4.block.compress(data, store_size=True)


def _unlz4(data: memoryview | bytes, limit: int) -> bytes:
    """An lz4 block of exactly `limit` bytes, its stored size checked first (lz4 allocates
    what it declares)."""
    declared = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
    if declared != limit:
        raise InvalidArgument("payload", f"lz4 block of {declared} bytes where {limit} fit")
    try:
        raw = lz4.block.decompress(data)
    except lz4.block.LZ4BlockError as exc:
        raise InvalidArgument("payload", f"lz4 block does not decode: {exc}") from None
    if len(raw) != limit:
        raise InvalidArgument("payload", f"lz4 block of {len(raw)} bytes where {limit} fit")
    return raw


def _planes(array: np.ndarray) -> np.ndarray:
    """Byte planes: every value's k-th byte together (bitwise for 2-byte values: fast)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.itemsize == 2:
        words = flat.view(np.uint16)
        return np.concatenate([(words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)])
    return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, flat.dtype.itemsize).T)


def _unplanes(raw: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    planes = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, -1)
    if dtype.itemsize == 2:
        words = (planes[0].astype(np.uint16) << 8) | planes[1]
        return words.view(dtype).reshape(shape)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


def _bytes_codec(name: str, pack: Callable, unpack: Callable, shuffle: bool) -> Codec:
    def encode(array: np.ndarray, layout: str) -> bytes:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return pack(_planes(array) if shuffle else flat)

    def decode(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...], layout: str):
        raw = unpack(payload, math.prod(shape) * dtype.itemsize)
        if shuffle:
            return _unplanes(raw, dtype, shape)
        return np.frombuffer(raw, dtype).reshape(shape)

    return Codec(name, False, encode, decode)


# ---- split-zstd: exponents entropy-coded, mantissas raw ---------------------------------

NIBBLE_FLOOR = 11
"""An exponent goes as a nibble n, standing for its channel's mean exponent + n - 11: the
bulk of real KV's exponents lie in [mean - 11, mean + 4]; the rest go as exceptions."""
BF16_NIBBLES, BF16_RAW_NIBBLES, FP16_NIBBLES = 4, 5, 6  # payload modes (first byte)


def _token_rows(words: np.ndarray) -> np.ndarray:
    """(tokens, channels): a channel's values over the block's tokens form one column."""
    return words.reshape(words.shape[0] if words.ndim else 1, -1)


SCRATCH_BYTES = 48 << 20
"""What each codec thread keeps for reuse at most (about 5x a block): beyond it,
temporaries are allocated afresh."""


def _scratch(slot: str, count: int, dtype: type) -> np.ndarray:
    """A buffer of this thread's, reused from call to call: faulting in fresh pages for
    every temporary costs more than the codec's own passes over them."""
    buffers = _local.__dict__.setdefault("scratch", {})
    buffer = buffers.get(slot)
    if buffer is None or len(buffer) < count:
        buffer = np.empty(count, dtype)
        if sum(b.nbytes for s, b in buffers.items() if s != slot) + buffer.nbytes <= SCRATCH_BYTES:
            buffers[slot] = buffer
    return buffer[:count]


SPLIT_HEAD = struct.Struct("<BII")  # mode, channels, exceptions


def _split_payload(
    mode: int, channels: int, outside: np.ndarray, exceptions: np.ndarray, coded, words
) -> np.ndarray:
    """A split payload, each part copied once into place: the head, the exceptions
    (indexes, then values), the coded exponents, and last the low bytes of `words`."""
    head = SPLIT_HEAD.pack(mode, channels, len(outside))
    parts = [head, outside.astype("<u4"), exceptions, coded]
    sizes = [memoryview(part).nbytes for part in parts]
    payload = np.empty(sum(sizes) + words.size, np.uint8)
    pos = 0
    for part, size in zip(parts, sizes, strict=True):
        payload[pos : pos + size] = np.frombuffer(part, np.uint8)
        pos += size
    np.copyto(payload[pos:].reshape(words.shape), words, casting="unsafe")  # low bytes
    return payload


def _split_fields(payload: memoryview, count: int):
    """A split payload's mode, channels, exceptions (indexes, values), coded exponents
    (still as sent) and low bytes."""
    mode, channels, n_out = SPLIT_HEAD.unpack_from(payload)
    if not 0 < channels <= count or count % channels:
        raise InvalidArgument("payload", f"split payload of {channels} channels, {count} values")
    pos = SPLIT_HEAD.size
    outside = np.frombuffer(payload, "<u4", n_out, pos)
    exceptions = np.frombuffer(payload, np.uint8, n_out, pos + 4 * n_out)
    coded = payload[pos + 5 * n_out : len(payload) - count]
    low = np.frombuffer(payload, np.uint8, count, len(payload) - count)
    return mode, channels, outside, exceptions, coded, low


def _bf16_encode(words: np.ndarray, entropy_coded: bool) -> np.ndarray:
    """Rotated left by one bit, a bf16 word has its exponent in the high byte and its
    mantissa and sign (noise) in the low byte, which goes raw. Exponents go as nibbles
    around their channel's mean (channels differ, a channel's tokens hardly), two to a
    byte, through zstd (close to their entropy) or raw (half the cost, for fast links)."""
    rows = _token_rows(words)
    n, channels = rows.size, rows.shape[1]
    rotated = _scratch("rotated", n, np.uint16).reshape(rows.shape)
    shifted = _scratch("shifted", n, np.uint16).reshape(rows.shape)
    np.right_shift(rows, 15, out=rotated)
    np.left_shift(rows, 1, out=shifted)
    rotated |= shifted
    exponent = _scratch("exponent", n, np.uint8).reshape(rows.shape)
    np.right_shift(rotated, 8, out=shifted)
    np.copyto(exponent, shifted, casting="unsafe")
    center = np.rint(exponent.mean(axis=0, dtype=np.float32)).astype(np.int16)
    nibbles = _scratch("nibbles", n + 1, np.uint8)
    nibbles[-1] = 0  # the pad of an odd count
    np.subtract(
        exponent, (center - NIBBLE_FLOOR).astype(np.uint8), out=nibbles[:n].reshape(rows.shape)
    )
    outside = np.flatnonzero(np.greater(nibbles[:n], 15, out=_scratch("outside", n, bool)))
    exceptions = exponent.reshape(-1)[outside]
    nibbles[outside] = 0
    pairs = nibbles[: n + n % 2].view("<u2")
    high = np.right_shift(pairs, 4, out=shifted.reshape(-1)[: len(pairs)])
    high &= 0xF0
    pairs &= 0xF
    pairs |= high
    packed = _scratch("packed", channels + len(pairs), np.uint8)
    packed[:channels] = center - NIBBLE_FLOOR
    np.copyto(packed[channels:], pairs, casting="unsafe")
    coded = _zstd(packed) if entropy_coded else packed
    mode = BF16_NIBBLES if entropy_coded else BF16_RAW_NIBBLES
    return _split_payload(mode, channels, outside, exceptions, coded, rotated)


def _bf16_decode(payload: memoryview, count: int) -> np.ndarray:
    mode, channels, outside, exceptions, coded, low = _split_fields(payload, count)
    need = channels + (count + 1) // 2  # channel centers, then two nibbles a byte
    coded = np.frombuffer(_unzstd(coded, need) if mode == BF16_NIBBLES else coded, np.uint8)
    if len(coded) != need:
        raise InvalidArgument("payload", f"split payload of {len(coded)} coded bytes, not {need}")
    pairs = _scratch("pairs", len(coded) - channels, np.uint16)
    np.copyto(pairs, coded[channels:])
    high = _scratch("spare", len(pairs), np.uint16)
    np.bitwise_and(pairs, 0xF0, out=high)
    high <<= 4
    pairs &= 0xF
    pairs |= high
    exponent = pairs.view(np.uint8)[:count]
    np.add(exponent.reshape(-1, channels), coded[:channels], out=exponent.reshape(-1, channels))
    exponent[outside] = exceptions
    words = np.empty(count, np.uint16)
    np.copyto(words, exponent)
    words <<= 8
    words |= low
    low_bit = _scratch("spare", count, np.uint16)
    np.left_shift(words, 15, out=low_bit)
    words >>= 1
    words |= low_bit
    return words


def _fp16_encode(words: np.ndarray) -> np.ndarray:
    """A float16 word's high byte is sign, 5 exponent bits and 2 mantissa bits; its low
    byte is mantissa noise and goes raw. The exponent becomes a nibble around its
    channel's mean, the sign is flipped where the channel is mostly negative, and the
    channels go channel-major, ordered by how settled their sign is: zstd's tables then
    follow classes of channels instead of mixing them."""
    rows = _token_rows(words)
    channels = rows.shape[1]
    high = (rows >> 8).astype(np.uint8)
    center = np.rint(((high >> 2) & 0x1F).mean(axis=0, dtype=np.float32)).astype(np.int16)
    offset = ((center - NIBBLE_FLOOR) * 4).astype(np.uint8)  # in units of the exponent field
    negative = (high >> 7).mean(axis=0, dtype=np.float32)
    flip = np.where(negative > 0.5, 0x80, 0).astype(np.uint8)
    body = (high & 0x7F) - offset  # the nibble and the 2 mantissa bits, when it fits 6 bits
    outside = np.flatnonzero(body > 63)
    exceptions = high.reshape(-1)[outside]
    symbols = ((high ^ flip) >> 7 << 6) | (body & 63)
    settled = np.rint(np.abs(negative - 0.5) * 64).astype(np.uint8)
    columns = symbols.T[np.argsort(settled, kind="stable")]
    coded = _zstd(np.concatenate([offset, settled | flip, columns.reshape(-1)]))
    return _split_payload(FP16_NIBBLES, channels, outside, exceptions, coded, rows)


def _fp16_decode(payload: memoryview, count: int) -> np.ndarray:
    _, channels, outside, exceptions, coded, low = _split_fields(payload, count)
    coded = np.frombuffer(_unzstd(coded, 2 * channels + count), np.uint8)
    offset, tag = coded[:channels], coded[channels : 2 * channels]
    columns = np.empty((channels, count // channels), np.uint8)
    columns[np.argsort(tag & 0x7F, kind="stable")] = coded[2 * channels :].reshape(channels, -1)
    symbols = np.ascontiguousarray(columns.T)
    high = (symbols >> 6 << 7) ^ (tag & 0x80)
    symbols &= 63
    symbols += offset
    symbols &= 0x7F
    high |= symbols
    high.reshape(-1)[outside] = exceptions
    words = high.astype(np.uint16).reshape(-1)
    words <<= 8
    words |= low
    return words


def _split_encoder(entropy_coded: bool) -> Callable[[np.ndarray, str], Buffer]:
    def encode(array: np.ndarray, layout: str) -> Buffer:
        if array.size == 0:
            return b""
        words = np.ascontiguousarray(array).view(np.uint16)
        if array.dtype == "bfloat16":
            return _bf16_encode(words, entropy_coded)
        return _fp16_encode(words)

    return encode


def _split_decode(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...], layout: str):
    count = int(np.prod(shape))
    if count == 0:
        return np.empty(shape, dtype)
    if payload[0] in (BF16_NIBBLES, BF16_RAW_NIBBLES):
        return _bf16_decode(payload, count).view(dtype).reshape(shape)
    if payload[0] == FP16_NIBBLES:
        return _fp16_decode(payload, count).view(dtype).reshape(shape)
    raise InvalidArgument("payload", f"split payload of unknown mode {payload[0]}")


# ---- lossy: int8, int4, fp8 -----------------------------------------------------------


def _kv_halves(array: np.ndarray, layout: str) -> list[tuple[np.ndarray, int]]:
    """(part, scale axis) pairs: keys scaled per channel (over tokens, axis 0), values
    per token and head (over the last axis). Without a `kv` axis in the layout, every
    vector along the last axis gets its own scale."""
    axes = layout.split(",") if layout else []
    if "kv" in axes and array.shape[axes.index("kv")] == 2 and len(axes) == array.ndim:
        k = axes.index("kv")
        return [(np.take(array, 0, axis=k), 0), (np.take(array, 1, axis=k), -1)]
    return [(array, -1)]


def _scaled_parts(shape: tuple[int, ...], layout: str):
    """(part shape, scale shape) of each of `_kv_halves`, from the shape alone."""
    axes = layout.split(",") if layout else []
    parts = [(tuple(shape), -1)]
    if "kv" in axes and len(axes) == len(shape) and shape[axes.index("kv")] == 2:
        k = axes.index("kv")
        half = (*shape[:k], *shape[k + 1 :])
        parts = [(half, 0), (half, -1)]
    for part, axis in parts:
        scale = list(part)
        scale[axis] = 1
        yield part, tuple(scale)


def _join_halves(parts: list[np.ndarray], layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0].reshape(shape)
    return np.stack(parts, axis=layout.split(",").index("kv"))


def _quantizer(levels: int, bits: int, fp8: bool = False):
    def encode(array: np.ndarray, layout: str) -> bytes:
        out = []
        for part, axis in _kv_halves(array.astype(np.float32), layout):
            top = np.abs(part).max(axis=axis, keepdims=True)
            scale = np.where(top > 0, top / levels, 1).astype(np.float32)
            if fp8:
                codes = (part / scale).astype(ml_dtype("float8_e4m3fn")).view(np.uint8)
            else:
                codes = np.clip(np.rint(part / scale), -levels, levels).astype(np.int8)
                if bits == 4:
                    flat = np.concatenate([codes.reshape(-1), np.zeros(codes.size % 2, np.int8)])
                    codes = ((flat[0::2] & 0xF) | (flat[1::2] << 4)).astype(np.uint8)
            out += [scale.tobytes(), np.ascontiguousarray(codes).tobytes()]
        return b"".join(out)

    def size(shape: tuple[int, ...], layout: str) -> int:
        """The payload's size: each part's scales, then its codes."""
        return sum(
            4 * math.prod(scale) + (math.prod(part) if bits == 8 else (math.prod(part) + 1) // 2)
            for part, scale in _scaled_parts(shape, layout)
        )

    def decode(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...], layout: str):
        if len(payload) != (need := size(shape, layout)):
            raise InvalidArgument("payload", f"{len(payload)} bytes where {shape} takes {need}")
        parts, pos = [], 0
        for part_shape, scale_shape in _scaled_parts(shape, layout):
            n_scale, n_values = math.prod(scale_shape), math.prod(part_shape)
            scale = np.frombuffer(payload[pos : pos + 4 * n_scale], np.float32).reshape(scale_shape)
            pos += 4 * n_scale
            n_codes = n_values if bits == 8 else (n_values + 1) // 2
            raw = np.frombuffer(payload[pos : pos + n_codes], np.uint8)
            pos += n_codes
            if fp8:
                values = raw.view(ml_dtype("float8_e4m3fn")).astype(np.float32)
            elif bits == 4:
                pairs = np.empty((len(raw), 2), np.int8)
                pairs[:, 0] = (raw.astype(np.int8) << 4) >> 4  # sign-extend the low nibble
                pairs[:, 1] = raw.astype(np.int8) >> 4
                values = pairs.reshape(-1)[:n_values].astype(np.float32)
            else:
                values = raw.view(np.int8).astype(np.float32)
            parts.append(values.reshape(part_shape) * scale)
        return _join_halves(parts, layout, shape).astype(dtype)

    return encode, decode, size


INT8_ERROR = 0.0095
"""int8's rounding error, RMS over the block relative to the block's RMS. Uniform
rounding with step s errs by s/sqrt(12), whatever the data, so the steps are set to it."""
VALUES_ERROR = 1.5
"""How much more relative error values take than keys: an error in a key moves the
attention logits, which softmax exponentiates; an error in a value is averaged."""


INT8_HEAD, INT8_MODE = "<BII", 1  # mode, steps, exceptions


def _groups(shape: tuple[int, ...], layout: str) -> tuple[list[int], bool]:
    """The axes that get one rounding step per index (the layout's `layers` and `kv`, in
    that order, those it has), and whether the last of them is `kv`."""
    axes = layout.split(",") if layout else []
    if len(axes) != len(shape):
        return [], False
    named = [axes.index(a) for a in ("layers", "kv") if a in axes[1:]]
    is_kv = "kv" in axes[1:] and shape[axes.index("kv")] == 2
    return named, is_kv


def _grouped(array: np.ndarray, axes: list[int]) -> np.ndarray:
    """(tokens, groups, channels) float32, the step-sharing axes moved next to tokens."""
    moved = np.moveaxis(array, axes, range(1, 1 + len(axes))) if axes else array
    tokens = moved.shape[0] if moved.ndim else 1
    groups = int(np.prod(moved.shape[1 : 1 + len(axes)]))
    return moved.astype(np.float32).reshape(tokens, groups, -1)


def _int8_encode(array: np.ndarray, layout: str) -> bytes:
    """One rounding step per layer and half (keys, values), not per token or channel:
    with the codes entropy-coded after, the bits go where the error is. A key channel's
    offset (keys carry large per-channel means) goes once, as that channel's zero point,
    and a channel that drifts slowly over tokens (many key channels) goes as differences.
    Codes beyond int8 go aside as exceptions. Channels go channel-major, ordered by
    spread, so the zstd stacked on top meets codes of one spread at a time."""
    if array.size == 0:
        return struct.pack(INT8_HEAD, INT8_MODE, 0, 0)
    axes, is_kv = _groups(array.shape, layout)
    x = _grouped(array, axes)
    if not np.isfinite(x).all():
        raise InvalidArgument("payloads", "int8 needs finite values")
    tokens, groups, width = x.shape
    energy = np.square(x).sum(axis=(0, 2), dtype=np.float64)
    weight = np.ones(groups)
    if is_kv:
        weight[1::2] = VALUES_ERROR  # the groups alternate keys, values
    spent = (np.square(weight) * energy).sum()
    error = INT8_ERROR * np.sqrt(energy.sum() / spent) * weight if spent else weight
    rms = np.sqrt(energy / (tokens * width))
    step = np.where(rms > 0, np.sqrt(12) * error * rms, 1).astype(np.float32)
    x /= step[:, None]
    x = x.reshape(tokens, -1)
    zero = np.clip(np.rint(x.mean(axis=0)), -32767, 32767).astype("<i2")  # the rest: exceptions
    np.rint(x, out=x)
    x -= zero
    every = max(1, tokens // 64)  # a sample of tokens judges a channel
    smooth = np.zeros(x.shape[1], bool)
    if tokens > 2:  # channels whose last token predicts the next go as differences
        steps = x[1::every] - x[:-1:every]  # from one token to the next, sampled
        smooth = steps.var(axis=0) < x[::every].var(axis=0)
        x[1:, smooth] = np.diff(x[:, smooth], axis=0)
    outside = np.flatnonzero(np.abs(x) > 127).astype("<u4")
    exceptions = x.reshape(-1)[outside].astype("<i4")
    spread = np.rint(4 * np.log2(1 + np.abs(x[::every]).mean(axis=0)))
    rank = (np.minimum(spread, 127) + 128 * smooth).astype(np.uint8)
    np.clip(x, -127, 127, out=x)
    codes = x.astype(np.int8).T[np.argsort(rank, kind="stable")]
    head = struct.pack(INT8_HEAD, INT8_MODE, len(step), len(outside))
    return b"".join(
        [head, step.data, zero.data, rank.data, outside.data, exceptions.data, codes.data]
    )


def _int8_bound(shape: tuple[int, ...], layout: str) -> int:
    """The most an int8 payload takes: every value an exception (8 bytes more) at worst."""
    count = math.prod(shape)
    _, _, channels, groups = _int8_dims(shape, layout)
    return struct.calcsize(INT8_HEAD) + 4 * groups + 3 * channels + 9 * count


def _int8_dims(shape: tuple[int, ...], layout: str):
    """The step-sharing axes, the shape with them moved next to tokens, the channels (all
    but tokens) and the steps (one per index of the step-sharing axes)."""
    axes, _ = _groups(shape, layout)
    order = [0, *axes, *(i for i in range(1, len(shape)) if i not in axes)]
    moved = tuple(shape[i] for i in order) if shape else (1,)
    return axes, moved, math.prod(moved[1:]), math.prod(shape[a] for a in axes)


def _int8_decode(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...], layout: str):
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    axes, moved, channels, groups = _int8_dims(shape, layout)
    tokens = moved[0]
    mode, n_steps, n_out = struct.unpack_from(INT8_HEAD, payload)
    if mode != INT8_MODE:
        raise InvalidArgument("payload", f"int8 payload of unknown mode {mode}")
    need = struct.calcsize(INT8_HEAD) + 4 * n_steps + 3 * channels + 8 * n_out + tokens * channels
    if n_steps != groups or n_out > tokens * channels or len(payload) != need:
        raise InvalidArgument("payload", f"int8 payload does not fit {shape} as {layout!r}")
    pos, fields = struct.calcsize(INT8_HEAD), []
    for kind, count in (("<f4", n_steps), ("<i2", channels), ("u1", channels), ("<u4", n_out)):
        fields.append(np.frombuffer(payload, kind, count, pos))
        pos += fields[-1].nbytes
    step, zero, rank, outside = fields
    exceptions = np.frombuffer(payload, "<i4", n_out, pos)
    codes = np.empty((channels, tokens), np.int8)
    codes[np.argsort(rank, kind="stable")] = np.frombuffer(
        payload, np.int8, channels * tokens, pos + 4 * n_out
    ).reshape(channels, tokens)
    x = codes.T.astype(np.float32, order="C")
    x.reshape(-1)[outside] = exceptions
    smooth = rank >= 128
    x[:, smooth] = np.cumsum(x[:, smooth], axis=0)
    x += zero.astype(np.float32)
    x = x.reshape(tokens, n_steps, -1)
    x *= step[:, None]
    x = x.reshape(moved)
    return np.moveaxis(x, range(1, 1 + len(axes)), axes).reshape(shape).astype(dtype)


def _stacked(codec: Codec) -> Codec:
    """`codec` then zstd over its output (quantized codes compress further)."""
    bound = codec.bound
    assert bound is not None, f"{codec.name} is not stackable"
    return Codec(
        f"{codec.name}+zstd",
        codec.lossy,
        lambda array, layout: _zstd(codec.pack(array, layout)),
        lambda payload, dtype, shape, layout: codec.unpack(
            memoryview(_unzstd(payload, bound(shape, layout), exact=False)),
            dtype,
            shape,
            layout,
        ),
        codec.dtypes,
    )


def _registry() -> dict[str, Codec]:
    codecs = [
        _bytes_codec("lz4", _lz4, _unlz4, shuffle=False),
        _bytes_codec("zstd", _zstd, _unzstd, shuffle=False),
        _bytes_codec("shuffle-lz4", _lz4, _unlz4, shuffle=True),
        _bytes_codec("shuffle-zstd", _zstd, _unzstd, shuffle=True),
        Codec("split-zstd", False, _split_encoder(True), _split_decode, ("float16", "bfloat16")),
        Codec("split", False, _split_encoder(False), _split_decode, ("bfloat16",)),
    ]
    int8 = Codec("int8", True, _int8_encode, _int8_decode, FLOATS, _int8_bound)
    codecs += [int8, _stacked(int8)]
    for name, (levels, bits, fp8) in {
        "int4": (7, 4, False),
        "fp8": (448, 8, True),
    }.items():
        encode, decode, size = _quantizer(levels, bits, fp8)
        codec = Codec(name, True, encode, decode, FLOATS, size)
        codecs += [codec, _stacked(codec)]
    return {c.name: c for c in codecs}


CODECS: dict[str, Codec] = _registry()
NAMES = frozenset({"", "none", *CODECS})


AUTO_CANDIDATES = ("split", "shuffle-lz4", "zstd", "shuffle-zstd", "split-zstd")


def choose(sample: np.ndarray, layout: str, link_gbps: float | None, cores: int) -> str:
    """The lossless codec that delivers raw KV fastest over a `link_gbps` link, put then
    get, with encoding and decoding spread over `cores`: each candidate is timed on
    `sample` (a block of the KV to send), here. "none" when no codec pays for itself,
    and always on an unlimited link (`link_gbps` None or 0)."""
    if not link_gbps or sample.nbytes == 0:
        return "none"
    wire = link_gbps * 1e9 / 8  # bytes per second

    def seconds_per_byte(name: str) -> float:
        if name == "none":
            return 2 / wire
        codec = CODECS[name]
        if codec.dtypes and sample.dtype not in codec.dtypes:
            return float("inf")
        codec.encode(sample[:1], layout)  # first calls set up contexts: not timed
        start = time.perf_counter()
        payload = codec.encode(sample, layout)
        # numpy's stubs give an ndarray the buffer protocol on Python 3.12 and later only
        view = memoryview(payload)  # type: ignore[arg-type]
        codec.decode(view, sample.dtype, sample.shape, layout)
        end = time.perf_counter()
        ratio = sample.nbytes / len(payload)
        return (end - start) / cores / sample.nbytes + 2 / (wire * ratio)

    return min(("none", *AUTO_CANDIDATES), key=seconds_per_byte)


def get(name: str) -> Codec | None:
    """The codec called `name`; None for no encoding ("" or "none")."""
    if name in ("", "none"):
        return None
    try:
        return CODECS[name]
    except KeyError:
        raise InvalidArgument("codec", f"unknown codec {name!r}; known: {sorted(NAMES)}") from None
