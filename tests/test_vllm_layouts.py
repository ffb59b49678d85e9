"""kvstore.integrations.vllm.layouts against vLLM 0.32's own code (its CPU build, CPU tensors).

Each layer tensor is made the way vLLM's GPU model runner makes it: the backend's spec
(`customize_attention_spec`), the engine's `KVCacheConfig` (`get_kv_cache_config_from_groups`),
the runner's kernel block sizes (`prepare_kernel_block_sizes`) and `allocate_kv_cache`, filled
with seeded random bytes. A block's regions, concatenated, must be exactly the bytes the
backend's own indexing of that block covers, in the documented page order: `[H, N, C]` in the
layout's physical order (`KVCacheLayout.layer_view_order`), kernel blocks outermost, and in C
K's head_size then V's ("kv-in-c"), per head K's N rows then V's ("kv-rows", CPU_ATTN), or the
latent ("latent", MLA). A backend vLLM's CPU build cannot import is skipped, with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvstore.errors import InvalidArgument, Unsupported

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed: pip install -e '.[vllm]' (tests/setup.sh does)",
)

BACKENDS = [
    *("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "CPU_ATTN"),
    *("FLASHMLA", "TRITON_MLA", "CUTLASS_MLA", "FLASHINFER_MLA", "FLASH_ATTN_MLA", "CPU_MLA"),
]
LAYERS = 3  # the middle one is checked: other layers' pages lie on both sides of its own
BLOCKS = 5
KV_GEOMETRIES = [(64, 2, 64), (128, 4, 128)]  # block size, KV heads, head size
MLA_GEOMETRIES = [(64, 1, 576), (128, 1, 576)]  # kv_lora_rank 512 + rope 64: DeepSeek's
CACHE_DTYPES = [  # (CacheConfig.cache_dtype, model dtype)
    ("auto", torch.bfloat16),
    ("auto", torch.float16),
    ("auto", torch.float32),
    ("fp8", torch.bfloat16),
]


def backend_class(name: str) -> type:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum[name].get_class()
    except Exception as exc:  # e.g. flashinfer absent, or CUDA-only kernels
        pytest.skip(f"{name}: vLLM's CPU build cannot import it ({type(exc).__name__}: {exc})")


def layer_cache(
    backend: type, layout: str, spec, seed: int, kernel_block_size: int | None = None
) -> tuple[torch.Tensor, object]:
    """The middle layer's tensor as the GPU model runner allocates it, and its spec; the
    runner's kernel block size unless `kernel_block_size` says which a backend would pick."""
    from vllm.config import CacheConfig, VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, KVCacheLayout
    from vllm.v1.worker.utils import (
        AttentionGroup,
        allocate_kv_cache,
        customize_attention_spec,
        prepare_kernel_block_sizes,
    )

    config = VllmConfig(
        cache_config=CacheConfig(block_size=spec.block_size, num_gpu_blocks_override=BLOCKS)
    )
    config.cache_config.kv_cache_layout = layout  # as the engine core resolves it
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    spec = customize_attention_spec(backend, spec)
    kv_cache_config = get_kv_cache_config_from_groups(
        config, [KVCacheGroupSpec(names, spec)], 1 << 30
    )
    groups = [[AttentionGroup(backend, names, spec, 0)]]
    kernel_block_sizes = [kernel_block_size] if kernel_block_size else None
    kernel_block_sizes = kernel_block_sizes or prepare_kernel_block_sizes(kv_cache_config, groups)
    caches = allocate_kv_cache(
        kv_cache_config, torch.device("cpu"), KVCacheLayout[layout], kernel_block_sizes
    )
    tensor = caches[names[1]]
    storage = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    generator = torch.Generator().manual_seed(seed)
    storage.copy_(torch.randint(0, 256, storage.shape, dtype=torch.uint8, generator=generator))
    return tensor, spec


def cpu_isa(spec, cache_dtype: str) -> str:
    """The ISA CPU_ATTN's metadata builder picks (`layer.isa`), which packs K in its pages."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, cache_dtype)


def attention_spec(packing: str, geometry: tuple[int, int, int], cache_dtype: str, dtype):
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, get_kv_quant_mode

    block_size, heads, head_size = geometry
    cache_torch_dtype = STR_DTYPE_TO_TORCH_DTYPE.get(cache_dtype, dtype)  # "auto": the model's
    quant = get_kv_quant_mode(cache_dtype)
    if packing == "latent":
        return MLAAttentionSpec(
            block_size=block_size,
            num_kv_heads=1,
            head_size=head_size,
            dtype=cache_torch_dtype,
            cache_dtype_str=cache_dtype,
            kv_quant_mode=quant,
        )
    return FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=heads,
        head_size=head_size,
        dtype=cache_torch_dtype,
        kv_quant_mode=quant,
    )


def vllm_page(
    packing: str, tensor: torch.Tensor, layout: str, spec, block: int, fp8: bool
) -> torch.Tensor:
    """Block `block`'s bytes as the backend's forward indexes them, in the page order."""
    from vllm.v1.kv_cache_interface import KVCacheLayout

    kernel_blocks = spec.block_size // tensor.shape[2]
    rows = slice(block * kernel_blocks, (block + 1) * kernel_blocks)
    if packing == "kv-in-c":  # FlashAttention, Triton, FlashInfer: (B, N, H, D) each
        key, value = tensor.transpose(1, 2).split(spec.head_size, dim=-1)
        if fp8:
            key, value = key.view(torch.float8_e4m3fn), value.view(torch.float8_e4m3fn)
        page = torch.cat([key[rows].view(torch.uint8), value[rows].view(torch.uint8)], dim=-1)
        page = page.transpose(1, 2).permute(*KVCacheLayout[layout].layer_view_order)
    elif packing == "kv-rows":  # CPU_ATTN (LBHNC only): (B, H, N, D) each
        blocks, heads, tokens, _ = tensor.shape
        key, value = tensor.view(blocks, heads, tokens * 2, -1).chunk(2, dim=2)
        page = torch.cat([key[rows], value[rows]], dim=2).view(torch.uint8)
    else:  # MLA: MLAAttention.bind_kv_cache's view, (B, N, C)
        latent = tensor.squeeze(1)
        page = (latent.view(torch.float8_e4m3fn) if fp8 else latent)[rows].view(torch.uint8)
    return page.contiguous().flatten()


@pytest.mark.parametrize(("cache_dtype", "dtype"), CACHE_DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_regions_are_the_bytes_vllm_indexes(backend_name: str, cache_dtype: str, dtype) -> None:
    from vllm.v1.kv_cache_interface import KVCacheLayout

    from kvstore.integrations.vllm.layouts import PACKINGS, CacheLayout, LayerPages

    backend = backend_class(backend_name)
    if (
        cache_dtype not in backend.supported_kv_cache_dtypes
        or dtype not in backend.supported_dtypes
    ):
        pytest.skip(f"{backend_name} takes no {cache_dtype} cache of a {dtype} model")
    packing = PACKINGS[backend_name]
    geometries = MLA_GEOMETRIES if packing == "latent" else KV_GEOMETRIES
    layouts = backend.supported_kv_cache_layouts() or list(KVCacheLayout)
    fp8 = cache_dtype == "fp8"
    for seed, (layout, geometry) in enumerate((x.name, g) for x in layouts for g in geometries):
        case = f"{backend_name} {layout} {geometry} {cache_dtype} {dtype}"
        spec = attention_spec(packing, geometry, cache_dtype, dtype)
        tensor, spec = layer_cache(backend, layout, spec, seed)
        variant = cpu_isa(spec, cache_dtype) if packing == "kv-rows" else ""
        described = CacheLayout(backend_name, layout, spec.block_size, cache_dtype, variant)
        pages = LayerPages(tensor, described)
        assert pages.page_bytes == spec.real_page_size_bytes, case
        assert pages.num_blocks == BLOCKS, case
        blocks = [BLOCKS - 1, 0, 2]
        regions = pages.regions(blocks)
        for block, page in zip(blocks, regions, strict=True):
            assert len(page) == pages.regions_per_page, case
            assert all(r.dtype == torch.uint8 and r.dim() == 1 for r in page), case
            assert all(
                r.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for r in page
            ), case  # views of vLLM's memory, not copies
            expected = vllm_page(packing, tensor, layout, spec, block, fp8)
            assert torch.equal(torch.cat(page), expected), case
        packed = torch.stack([torch.cat(page) for page in regions])
        assert torch.equal(pages.gather(blocks), packed), case  # one kernel, the same bytes
        if fp8:  # the float8 view the kernels take: the same name and bytes
            as_float8 = LayerPages(tensor.view(torch.float8_e4m3fn), described)
            assert as_float8.name == pages.name, case
            assert torch.equal(torch.cat(as_float8.regions([2])[0]), torch.cat(regions[2])), case

        # a page written into another block is that block's bytes as vLLM reads them, and only
        before = {b: vllm_page(packing, tensor, layout, spec, b, fp8).clone() for b in (2, 4)}
        saved = pages.gather([1])
        pages.scatter([3], saved)
        assert torch.equal(vllm_page(packing, tensor, layout, spec, 3, fp8), saved[0]), case
        for block, page in before.items():
            assert torch.equal(vllm_page(packing, tensor, layout, spec, block, fp8), page), case


def fa_cache(layout: str, block_size: int = 64) -> tuple[torch.Tensor, object]:
    spec = attention_spec("kv-in-c", (block_size, 2, 64), "auto", torch.bfloat16)
    return layer_cache(backend_class("FLASH_ATTN"), layout, spec, seed=7)


def test_names_say_the_bytes_of_a_page() -> None:
    """Layouts whose pages hold the same bytes in the same order share a name, others do not;
    kernel blocks are part of the name unless they only add tokens."""
    from kvstore.integrations.vllm.layouts import CacheLayout, LayerPages

    names = {
        layout: LayerPages(fa_cache(layout)[0], CacheLayout("FLASH_ATTN", layout, 64)).name
        for layout in ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
    }
    assert names["LBHNC"] == names["LHBNC"] == names["BLHNC"] == names["BHLNC"]
    assert names["LBHNC"] == "kv-in-c:bfloat16:H2xN64xC128"
    assert names["LBNHC"] == names["BLNHC"] == "kv-in-c:bfloat16:N64xH2xC128"

    flashmla, triton_mla = backend_class("FLASHMLA"), backend_class("TRITON_MLA")
    spec = attention_spec("latent", (128, 1, 576), "auto", torch.bfloat16)
    split, _ = layer_cache(flashmla, "LBHNC", spec, seed=8)  # FlashMLA's kernels take 64 tokens
    whole, _ = layer_cache(triton_mla, "LBHNC", spec, seed=9)
    assert split.shape[0] == 2 * whole.shape[0]
    assert (
        LayerPages(split, CacheLayout("FLASHMLA", "LBHNC", 128)).name
        == LayerPages(whole, CacheLayout("TRITON_MLA", "LBHNC", 128)).name
        == "latent:bfloat16:N128xC576"
    )


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_flashinfer_kernel_blocks_make_one_page(layout: str) -> None:
    """FlashInfer (not importable here) takes 16 to 64-token kernel blocks on Hopper, so the
    runner splits 128-token blocks in two (`select_common_block_size`); its forward splits K
    and V as FlashAttention's does (flashinfer.py `kv_cache_permute.split(hs, dim=-1)`)."""
    from kvstore.integrations.vllm.layouts import CacheLayout, LayerPages

    spec = attention_spec("kv-in-c", (128, 4, 128), "auto", torch.float16)
    tensor, spec = layer_cache(backend_class("FLASH_ATTN"), layout, spec, 11, kernel_block_size=64)
    assert tensor.shape[:3] == (2 * BLOCKS, 4, 64)
    pages = LayerPages(tensor, CacheLayout("FLASHINFER", layout, 128))
    assert (pages.num_blocks, pages.regions_per_page) == (BLOCKS, 1)
    assert pages.split == (layout == "LBHNC")  # K2 outside the heads: not one block's order
    assert pages.page_bytes == spec.real_page_size_bytes
    for block, page in zip(range(BLOCKS), pages.regions(range(BLOCKS)), strict=True):
        assert torch.equal(
            torch.cat(page), vllm_page("kv-in-c", tensor, layout, spec, block, False)
        )
    dims = "K2xH4xN64xC256" if layout == "LBHNC" else "N128xH4xC256"
    assert pages.name == f"kv-in-c:float16:{dims}"


@pytest.mark.parametrize(
    ("described", "needle"),
    [
        (("FLASH_ATTN", "NHD", 64), "NHD"),  # a legacy alias: vLLM resolves it to LBNHC
        (("FLASH_ATTN", "LBHCN", 64), "LBHCN"),
        (("FLEX_ATTENTION", "LBHNC", 64), "FLEX_ATTENTION"),
        (("FLASH_ATTN", "LBNHC", 64), "LBNHC"),  # strides of LBHNC
        (("FLASH_ATTN", "LHBNC", 64), "LHBNC"),
        (("FLASH_ATTN", "LBHNC", 48), "48-token"),
        (("FLASH_ATTN", "LBHNC", 64, "nvfp4"), "nvfp4"),
        (("FLASH_ATTN", "LBHNC", 64, "fp8"), "bfloat16 elements"),
        (("CPU_ATTN", "LBHNC", 64), "ISA"),
    ],
)
def test_unknown_layouts_and_mismatched_tensors_are_refused(described: tuple, needle: str) -> None:
    from kvstore.integrations.vllm.layouts import CacheLayout, LayerPages

    tensor, _ = fa_cache("LBHNC")
    with pytest.raises(Unsupported) as refused:
        LayerPages(tensor, CacheLayout(*described))
    message = str(refused.value)
    assert needle in message and described[0] in message
    assert str(tuple(tensor.shape)) in message and str(tensor.stride()) in message


@pytest.mark.parametrize(
    ("tensor", "layout", "block_size", "reason"),
    [
        (torch.empty(5, 64, 2, 128).transpose(1, 2), "LBHNC", 64, "dim H is not laid out"),
        (torch.empty(5, 2, 64, 256)[..., ::2], "LBHNC", 64, "content dim C is not packed"),
        (torch.empty(5, 2, 64, 256)[..., :128], "LBHNC", 64, "dim N is not laid out"),
        (
            torch.empty(2, 10, 64, 128).transpose(0, 1),
            "LHBNC",
            128,
            "2 kernel blocks per block that are not adjacent",
        ),
        (torch.empty(5, 2, 64, 128)[0], "LBHNC", 64, r"not \[B, H, N, C\]"),
    ],
    ids=["transposed", "strided-content", "rows-apart", "kernel-blocks-apart", "three-dims"],
)
def test_tensors_whose_strides_are_not_the_layouts_are_refused(
    tensor: torch.Tensor, layout: str, block_size: int, reason: str
) -> None:
    from kvstore.integrations.vllm.layouts import CacheLayout, LayerPages

    with pytest.raises(Unsupported, match=f"FLASH_ATTN {layout}: {reason}"):
        LayerPages(tensor, CacheLayout("FLASH_ATTN", layout, block_size))


def test_blocks_and_pages_out_of_range_are_refused() -> None:
    from kvstore.integrations.vllm.layouts import CacheLayout, LayerPages

    tensor, _ = fa_cache("BHLNC")
    pages = LayerPages(tensor, CacheLayout("FLASH_ATTN", "BHLNC", 64))
    before = tensor.clone()
    with pytest.raises(InvalidArgument, match="block_ids"):
        pages.regions([BLOCKS])
    with pytest.raises(InvalidArgument, match="block_ids"):
        pages.gather([0, -1])
    page = torch.zeros(2, pages.page_bytes, dtype=torch.uint8)
    with pytest.raises(InvalidArgument, match="block_ids"):
        pages.scatter([0, BLOCKS], page)
    with pytest.raises(InvalidArgument, match="pages"):
        pages.scatter([0, 1], page.to(torch.int8))
    with pytest.raises(InvalidArgument, match="pages"):
        pages.scatter([0], page[:, 1:])
    assert torch.equal(tensor.view(torch.uint8), before.view(torch.uint8))
