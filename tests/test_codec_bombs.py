"""Decompression bombs: a small payload that its codec would expand far past the size its
metadata declares fails with InvalidArgument, before allocating what it expands to; and
metadata whose shape and dtype disagree with the bytes fails a get the same way."""

from __future__ import annotations

import functools
import subprocess
import sys

import lz4.block
import numpy as np
import pytest
import xxhash
import zstandard

from kvstore.codecs import BF16_NIBBLES, CODECS, FP16_NIBBLES, SPLIT_HEAD, parse_dtype
from kvstore.errors import InvalidArgument
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta

SHAPE = (64, 32)  # 2048 values: 4096 bytes declared, as in the report
RAW_SIZE = 4096
HALF = CODECS["int8"].encode(np.ones((32, 32), np.float16), "")  # an int8 payload of 32 rows


@functools.cache
def zstd_bomb(size: int, declared: bool = True) -> bytes:
    """One zstd frame of `size` zero bytes (32 KB for 1 GiB), its size in the header
    unless not `declared`; compressed in pieces, never held whole."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=declared)
    stream = compressor.compressobj(size=size if declared else -1)
    piece = bytes(min(size, 16 << 20))
    parts = [stream.compress(piece) for _ in range(size // len(piece))]
    return b"".join([*parts, stream.flush()])


def lz4_bomb(size: int) -> bytes:
    """An lz4 block whose stored size claims `size` bytes (lz4 allocates that first)."""
    return size.to_bytes(4, "little") + lz4.block.compress(bytes(1 << 16), store_size=False)


def bombs(size: int) -> dict[str, tuple[str, bytes]]:
    """For each codec that decompresses: (dtype, payload) declaring `SHAPE` and expanding
    to `size` bytes (lz4: claiming them)."""
    low = bytes(SHAPE[0] * SHAPE[1])  # a split payload's raw low bytes
    split = {
        "bfloat16": SPLIT_HEAD.pack(BF16_NIBBLES, SHAPE[1], 0) + zstd_bomb(size) + low,
        "float16": SPLIT_HEAD.pack(FP16_NIBBLES, SHAPE[1], 0) + zstd_bomb(size) + low,
    }
    return {
        "zstd": ("float16", zstd_bomb(size)),
        "shuffle-zstd": ("float16", zstd_bomb(size)),
        "lz4": ("float16", lz4_bomb(size)),
        "shuffle-lz4": ("float16", lz4_bomb(size)),
        "split-zstd/bf16": ("bfloat16", split["bfloat16"]),
        "split-zstd/fp16": ("float16", split["float16"]),
        "split": ("bfloat16", split["bfloat16"]),  # the payload names its mode
        "int8+zstd": ("float16", zstd_bomb(size)),
        "int4+zstd": ("float16", zstd_bomb(size)),
        "fp8+zstd": ("float16", zstd_bomb(size)),
    }


def decode(case: str, dtype: str, payload: bytes) -> np.ndarray:
    """The shape and dtype alone bound the decode (`Client.get` checks `raw_size` too)."""
    return CODECS[case.split("/")[0]].decode(memoryview(payload), parse_dtype(dtype), SHAPE, "")


@pytest.mark.parametrize("case", sorted(bombs(1 << 20)))
def test_a_small_bomb_is_refused_in_place(case: str) -> None:
    dtype, payload = bombs(1 << 20)[case]
    with pytest.raises(InvalidArgument, match=r"payload: .*(zstd frame|lz4 block) of"):
        decode(case, dtype, payload)


@pytest.mark.parametrize("codec", ["zstd", "shuffle-zstd", "int8+zstd", "int4+zstd", "fp8+zstd"])
def test_a_frame_that_declares_no_size_is_bounded_too(codec: str) -> None:
    """zstd's own bound holds a frame without a declared size to what fits."""
    with pytest.raises(InvalidArgument, match="payload"):
        decode(codec, "float16", zstd_bomb(1 << 20, declared=False))


GUARDED = """
import re, resource, sys
from kvstore.codecs import CODECS, parse_dtype
name, dtype = sys.argv[1], parse_dtype(sys.argv[2])
payload = sys.stdin.buffer.read()
with open("/proc/self/status") as status:
    mapped = int(re.search(r"VmSize:\\s+(\\d+)", status.read()).group(1)) << 10
resource.setrlimit(resource.RLIMIT_AS, (mapped + (256 << 20), resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    CODECS[name].decode(memoryview(payload), dtype, (64, 32), "")
    print("decoded")
except BaseException as exc:
    print(type(exc).__name__, exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("case", sorted(bombs(1 << 30)))
def test_a_gigabyte_bomb_costs_no_memory(case: str) -> None:
    """32 KB that would expand to 1 GiB (lz4: that claims 1 GiB), decoded in a process
    that may map only 256 MiB more: a precise error, and the peak memory stays put."""
    dtype, payload = bombs(1 << 30)[case]
    done = subprocess.run(
        [sys.executable, "-c", GUARDED, case.split("/")[0], dtype],
        input=payload,
        capture_output=True,
        timeout=60,
        check=True,
    )
    error, grown = done.stdout.decode().splitlines()
    assert error.startswith("InvalidArgument payload: "), error
    assert int(grown) < 32 << 10, f"peak memory grew by {grown} KiB"


@pytest.mark.parametrize(
    ("transport", "case"),
    [
        ("shm", "zstd"),
        ("tcp", "zstd"),
        ("grpc", "zstd"),
        ("tcp", "split-zstd/bf16"),
        ("grpc", "lz4"),
        ("shm", "int8+zstd"),
    ],
)
def test_a_bomb_put_past_the_encoder_fails_the_get(daemon, transport: str, case: str) -> None:
    """A block put with handmade metadata (as a rogue producer would), its checksum good:
    the get refuses it with InvalidArgument, naming the block."""
    dtype, payload = bombs(64 << 20)[case]
    dtype_name = "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).str
    key = block_keys(np.arange(256), 256, f"bomb-{transport}-{case}".encode())[0]
    meta = BlockMeta(
        len(payload),
        dtype_name,
        SHAPE,
        "",
        case.split("/")[0],
        RAW_SIZE,
        xxhash.xxh3_64_intdigest(payload),
    )
    with daemon.client(transport=transport) as client:
        assert client.put_blocks([(key, meta)], [memoryview(payload)]).stored == 1
        with pytest.raises(InvalidArgument, match=rf"block {key.hex()}: .*(zstd frame|lz4 block)"):
            client.get([key])


@pytest.mark.parametrize(
    ("codec", "dtype", "shape", "raw_size", "payload", "error"),
    [
        ("", "<f2", (1000,), 0, bytes(4096), r"shape: .* does not fill a block of 4096"),
        ("", "|O", (512,), 0, bytes(4096), "dtype"),
        (
            "zstd",
            "<f2",
            (1000,),
            4096,
            zstandard.compress(bytes(4096)),
            r"raw_size: .*4096 bytes declared for <f2 \(1000,\)",
        ),
        ("zstd", "<f2", (2048,), 4096, zstandard.compress(bytes(2048)), "zstd frame of 2048"),
        ("lz4", "<f4", (1024,), 4096, lz4.block.compress(bytes(1024)), "lz4 block of 1024"),
        ("int8", "<f2", (64, 32), 4096, HALF, "int8 payload does not fit"),
        ("int4", "<f2", (64, 32), 2048, bytes(100), "raw_size"),
        ("split-zstd", "nonsense", (4,), 8, bytes(100), "dtype"),
    ],
    ids=["shape", "object", "raw_size", "short", "lz4-short", "int8", "int4-raw_size", "dtype"],
)
def test_metadata_that_disagrees_with_the_bytes_fails_the_get(
    daemon, codec: str, dtype: str, shape: tuple[int, ...], raw_size: int, payload, error: str
) -> None:
    key = block_keys(np.arange(256), 256, f"disagree-{codec}-{dtype}-{shape}".encode())[0]
    meta = BlockMeta(len(payload), dtype, shape, "", codec, raw_size, 0)
    with daemon.client(transport="tcp") as client:
        assert client.put_blocks([(key, meta)], [memoryview(payload)]).stored == 1
        with pytest.raises(InvalidArgument, match=error):
            client.get([key])
