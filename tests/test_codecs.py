"""Codecs on real KV (SmolLM2-135M, fp16 and bf16): exact round trips, bounded errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DATA
from kvstore import codecs
from kvstore.client import AsyncClient
from kvstore.client.pipeline import ENCODED_PART
from kvstore.codecs import BFLOAT16, CODECS, INT8_ERROR, LOSSY_BOUNDS, VALUES_ERROR
from kvstore.errors import InvalidArgument
from kvstore.keys import block_keys

LAYOUT = "tokens,layers,kv,heads,dim"


@pytest.fixture(scope="module")
def blocks(kv_sample: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Two 256-token blocks of each dtype: the same KV captured in fp16 and in bf16."""
    bf16 = np.load(DATA / "smollm2_kv_bf16_512tok.npy").view(BFLOAT16)
    return {"float16": [kv_sample[:256], kv_sample[256:]], "bfloat16": [bf16[:256], bf16[256:]]}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_round_trips_real_kv(blocks, name: str, dtype: str) -> None:
    codec = CODECS[name]
    if codec.dtypes and np.dtype(BFLOAT16 if dtype == "bfloat16" else dtype) not in codec.dtypes:
        pytest.skip(f"{name} does not take {dtype}")
    for block in blocks[dtype]:
        payload = codec.encode(block, LAYOUT)
        back = codec.decode(memoryview(payload), block.dtype, block.shape, LAYOUT)
        assert back.dtype == block.dtype and back.shape == block.shape
        if codec.lossy:
            assert relative_error(block, back) <= LOSSY_BOUNDS[name.split("+")[0]]
        else:
            assert np.array_equal(back.view(np.uint16), block.view(np.uint16))


def ratio(codec: str, block: np.ndarray) -> float:
    return block.nbytes / len(CODECS[codec].encode(block, LAYOUT))


def test_what_real_kv_compresses_to(blocks) -> None:
    bf16, fp16 = blocks["bfloat16"][0], blocks["float16"][0]
    assert ratio("lz4", bf16) < 1.02  # lz4 alone finds nothing in real KV
    assert ratio("zstd", bf16) < ratio("shuffle-zstd", bf16) < ratio("split-zstd", bf16)
    assert min(ratio("split-zstd", b) for b in blocks["bfloat16"]) >= 1.5
    assert min(ratio("split-zstd", b) for b in blocks["float16"]) >= 1.19
    for dtype in ("float16", "bfloat16"):
        assert min(ratio("int8+zstd", b) for b in blocks[dtype]) >= 2.5
    assert ratio("int4+zstd", fp16) >= 4


def test_int8_gives_every_layer_and_half_its_own_step(blocks) -> None:
    """With the layout known, keys err by at most INT8_ERROR of their RMS in every layer,
    values by VALUES_ERROR times that; one step for the whole block would round quiet
    layers far coarser."""
    block = blocks["float16"][0]
    int8 = CODECS["int8+zstd"]

    def errors(layout: str) -> np.ndarray:
        back = int8.decode(memoryview(int8.encode(block, layout)), block.dtype, block.shape, layout)
        return np.array(
            [[relative_error(block[:, i, h], back[:, i, h]) for h in (0, 1)] for i in range(30)]
        )

    per_layer = errors(LAYOUT)
    assert per_layer[:, 0].max() <= INT8_ERROR
    assert per_layer[:, 1].max() <= INT8_ERROR * VALUES_ERROR
    assert errors("").max() > 4 * per_layer.max()


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=5000), st.sampled_from(["lz4", "zstd", "shuffle-lz4", "shuffle-zstd"]))
def test_byte_codecs_round_trip_any_bytes(data: bytes, name: str) -> None:
    array = np.frombuffer(data, np.uint8)
    payload = CODECS[name].encode(array, "")
    assert CODECS[name].decode(memoryview(payload), array.dtype, array.shape, "").tobytes() == data


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 40), st.integers(0, 9), st.sampled_from(["float16", "bfloat16"]))
def test_split_and_int8_take_odd_shapes(tokens: int, width: int, dtype: str) -> None:
    rng = np.random.default_rng(tokens * 100 + width)
    values = rng.standard_normal((tokens, width)) * 10.0 ** rng.integers(-3, 3)
    values[:, ::2] = np.cumsum(values[:, ::2], axis=0)  # channels that drift, as keys do
    block = values.astype(np.float32).astype(np.dtype(dtype))
    int8 = CODECS["int8+zstd"]
    back = int8.decode(memoryview(int8.encode(block, "")), block.dtype, block.shape, "")
    assert back.shape == block.shape and back.dtype == block.dtype
    if block.size:  # rounding errs by at most half a step: 1.65% of the RMS
        assert relative_error(block, back) <= INT8_ERROR * 3**0.5 * 1.01
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 6e4], np.float32)
    block.reshape(-1)[: len(specials)] = specials[: block.size].astype(block.dtype)
    payload = CODECS["split-zstd"].encode(block, "")
    back = CODECS["split-zstd"].decode(memoryview(payload), block.dtype, block.shape, "")
    assert np.array_equal(back.view(np.uint16), block.view(np.uint16))


def test_codecs_refuse_what_they_cannot_encode() -> None:
    with pytest.raises(InvalidArgument, match="split-zstd needs float16 or bfloat16"):
        CODECS["split-zstd"].encode(np.zeros(4, np.float32), "")
    with pytest.raises(InvalidArgument, match="int8 needs float16, bfloat16, float32 or float64"):
        CODECS["int8"].encode(np.zeros(4, np.int32), "")
    with pytest.raises(InvalidArgument, match="int8 needs finite values"):
        CODECS["int8"].encode(np.array([1, np.inf], np.float32), "")
    with pytest.raises(InvalidArgument, match="unknown codec 'snappy'"):
        codecs.get("snappy")


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
def test_encoded_blocks_travel_through_the_daemon(daemon, blocks, transport: str) -> None:
    bf16 = blocks["bfloat16"]
    keys = block_keys(np.arange(512), 256, f"codec-{transport}".encode())
    with daemon.client(
        transport=transport, codec="split-zstd", layout=LAYOUT, checksum=True
    ) as client:
        assert client.put(keys, bf16).stored == 2
        got = client.get(keys)
        assert [g.dtype for g in got] == [BFLOAT16, BFLOAT16]
        assert all(
            np.array_equal(a.view(np.uint16), b.view(np.uint16))
            for a, b in zip(got, bf16, strict=True)
        )
        host = client.stats().tiers[0]
        lossy_keys = block_keys(np.arange(512), 256, f"codec-lossy-{transport}".encode())
        client.put(lossy_keys, bf16, codec="int8+zstd")
        assert (
            client.stats().tiers[0].payload_bytes - host.payload_bytes
            < sum(b.nbytes for b in bf16) / 2
        )
        for a, b in zip(client.get(lossy_keys), bf16, strict=True):
            assert relative_error(b, a) <= LOSSY_BOUNDS["int8"]


def test_a_client_refuses_an_unknown_codec(daemon) -> None:
    with pytest.raises(InvalidArgument, match="unknown codec"):
        daemon.client(codec="snappy")


def test_auto_sends_raw_on_a_fast_link_and_compresses_on_a_slow_one(blocks) -> None:
    block = blocks["bfloat16"][0]
    assert codecs.choose(block, LAYOUT, None, 2) == "none"  # unlimited
    assert codecs.choose(block, LAYOUT, 1e6, 2) == "none"  # no codec keeps up with it
    slow = codecs.choose(block, LAYOUT, 0.01, 2)
    assert slow in codecs.AUTO_CANDIDATES and not CODECS[slow].lossy
    assert len(CODECS[slow].encode(block, LAYOUT)) < block.nbytes / 1.3


@pytest.mark.parametrize("link_gbps", [None, 0.01])
def test_a_client_on_auto_encodes_as_its_link_wants(small_daemon, blocks, link_gbps) -> None:
    kv = blocks["bfloat16"]
    keys = block_keys(np.arange(512), 256, f"auto/{link_gbps}".encode())
    with small_daemon.client(codec="auto", layout=LAYOUT, link_gbps=link_gbps) as client:
        before = client.stats().tiers[0].payload_bytes
        client.put(keys, kv)
        stored = client.stats().tiers[0].payload_bytes - before
        got = client.get(keys)
    assert all(
        np.array_equal(g.view(np.uint16), b.view(np.uint16)) for g, b in zip(got, kv, strict=False)
    )
    raw = sum(b.nbytes for b in kv)
    assert stored == raw if link_gbps is None else stored < raw / 1.3


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
def test_encoded_puts_go_in_parts_and_refuse_bad_input_first(daemon, blocks, transport) -> None:
    """A batch over `ENCODED_PART` goes in parts as they are encoded and, over TCP, comes
    back decoded in parts as they land; a payload the codec cannot take, even the last,
    fails the put before any part is sent."""
    batch = blocks["bfloat16"] * 7
    assert sum(b.nbytes for b in batch) > 2 * ENCODED_PART
    keys = block_keys(np.arange(len(batch) * 256), 256, f"parts-{transport}".encode())
    with daemon.client(
        transport=transport, codec="split-zstd", layout=LAYOUT, checksum=True
    ) as client:
        with pytest.raises(InvalidArgument, match="split-zstd needs float16 or bfloat16"):
            client.put(keys, [*batch[:-1], np.zeros(4, np.float32)])
        assert client.lookup(keys) == 0
        assert client.put(keys, batch).stored == len(batch)
        got = client.get(keys)
        assert len(got) == len(batch)
        assert all(
            np.array_equal(a.view(np.uint16), b.view(np.uint16))
            for a, b in zip(got, batch, strict=True)
        )


async def test_async_encoded_puts_go_in_parts(daemon, blocks) -> None:
    batch = blocks["bfloat16"] * 7
    keys = block_keys(np.arange(len(batch) * 256), 256, b"parts-async")
    async with AsyncClient(daemon.address, codec="split-zstd", layout=LAYOUT) as client:
        assert (await client.put(keys, batch)).stored == len(batch)
        got = await client.get(keys)
        assert all(
            np.array_equal(a.view(np.uint16), b.view(np.uint16))
            for a, b in zip(got, batch, strict=True)
        )


def test_a_block_beyond_the_scratch_budget_round_trips_and_keeps_the_budget(blocks) -> None:
    """Temporaries for a block too large to keep are allocated afresh and let go."""
    block = np.concatenate(blocks["bfloat16"] * 3)  # 1536 tokens, 35 MB
    for name in ("split-zstd", "split"):
        codec = CODECS[name]
        back = codec.decode(
            memoryview(codec.encode(block, LAYOUT)), block.dtype, block.shape, LAYOUT
        )
        assert np.array_equal(back.view(np.uint16), block.view(np.uint16))
    kept = codecs._local.__dict__.get("scratch", {})
    assert sum(b.nbytes for b in kept.values()) <= codecs.SCRATCH_BYTES


@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_payload_that_does_not_decode_to_its_metadata_is_invalid(blocks, name: str) -> None:
    """Cut, lengthened or empty, or declared of another size than its shape and dtype: a
    payload fails its decode with InvalidArgument, never a bare numpy or codec error."""
    block = blocks["bfloat16"][0][:16]
    payload = bytes(CODECS[name].encode(block, LAYOUT))
    for bad in (payload[:-1], payload + b"\0", payload[:3], b""):
        with pytest.raises(InvalidArgument, match="payload"):
            CODECS[name].decode(memoryview(bad), block.dtype, block.shape, LAYOUT)
    with pytest.raises(InvalidArgument, match=f"raw_size: {block.nbytes // 2} bytes declared"):
        CODECS[name].decode(
            memoryview(payload), block.dtype, block.shape, LAYOUT, block.nbytes // 2
        )
