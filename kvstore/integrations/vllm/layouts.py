"""One layer's pages in vLLM 0.32's KV cache, on any device, as views of the layer's memory.

vLLM 0.32 hands `register_kv_caches` one tensor per attention layer, a view of one shared
allocation with the logical shape `[B, H, N, C]` (blocks, head slots, tokens, content) whatever
the backend; `KVCacheLayout` (`cache_config.kv_cache_layout`, e.g. "LBNHC") names the physical
order of `[L, B, H, N, C]`, layers included. A page (one layer of one block) is `t[b]`, one
contiguous run of bytes where L and B are the two outermost letters, else one run per head
(LHBNC, BHLNC: the layer or block index lies between heads). Where a backend's kernels take
fewer tokens than a block holds (FlashInfer's 64 on Hopper, FlashMLA's 64), B counts kernel
blocks, and a page is `block_size // N` adjacent ones.

A page's bytes are its `[H, N, C]` in the layout's own order, runs in head order, moved as they
are. Their meaning depends on that order, the sizes, the dtype and where the backend keeps K and
V (`PACKINGS`), not on where L sits, so the name says exactly those: an LBHNC engine and a
BHLNC one share pages, an LBNHC one does not. torch only, so that it runs without vLLM.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import NoReturn

import torch

from kvstore.errors import InvalidArgument, Unsupported

_DIMS = "BHNC"  # a layer tensor's logical dims: vLLM's [L, B, H, N, C] less L

# vLLM 0.32's `KVCacheLayout` member names: physical order of the logical [L, B, H, N, C].
LAYOUTS = frozenset({"LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"})

# Where each backend (`AttentionBackend.get_name()`) keeps K and V in a page's `[H, N, C]`:
# "kv-in-c": C is K's head_size then V's, per head and token (`transpose(1, 2).split(D, -1)`);
# "kv-rows": per head, K's N rows then V's (`view(B, H, 2N, D).chunk(2, dim=2)`), K packed by
# the kernel's ISA (`variant`); "latent": one head, C the compressed KV then the rope key.
PACKINGS = {
    "FLASH_ATTN": "kv-in-c",
    "FLASHINFER": "kv-in-c",
    "TRITON_ATTN": "kv-in-c",
    "CPU_ATTN": "kv-rows",
    "FLASHMLA": "latent",
    "FLASHINFER_MLA": "latent",
    "CUTLASS_MLA": "latent",
    "TRITON_MLA": "latent",
    "FLASH_ATTN_MLA": "latent",
    "CPU_MLA": "latent",
}

# `CacheConfig.cache_dtype` values whose pages hold plain K/V (or latent) elements; fp8 pages
# are 1-byte elements (vLLM allocates uint8 and the kernels view them as float8).
CACHE_DTYPES = frozenset({"auto", "float32", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"})


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """What vLLM says of its cache: `backend` is `AttentionBackend.get_name()`, `layout` is
    `cache_config.kv_cache_layout`, `block_size` is the group's `KVCacheSpec.block_size`,
    `cache_dtype` is `cache_config.cache_dtype`, `variant` is CPU_ATTN's ISA (`layer.isa`)."""

    backend: str
    layout: str
    block_size: int
    cache_dtype: str = "auto"
    variant: str = ""


class LayerPages:
    """The pages of one layer's tensor: `page_bytes` each, in `regions_per_page` runs of
    equal length, read and written in place (CPU or CUDA alike). Refuses (`Unsupported`) any
    layout it does not know and any tensor whose strides are not what the layout says."""

    def __init__(self, tensor: torch.Tensor, layout: CacheLayout) -> None:
        self._tensor, self._layout = tensor, layout
        packing = self._check_description()
        blocks, _, tokens, _ = tensor.shape
        kernel_blocks = layout.block_size // tokens
        # The tensor's dims in physical order, and those of a page inside both L and B: one
        # run. A page dim outside L or B (H in LHBNC and BHLNC) makes one run per index.
        order = [_DIMS.index(d) for d in layout.layout.replace("L", "")]
        last_outer = max(layout.layout.index("L"), layout.layout.index("B"))
        inner = {_DIMS.index(d) for d in layout.layout[last_outer + 1 :]}
        self._check_strides(order, inner, kernel_blocks)

        size, stride, item = tensor.shape, tensor.stride(), tensor.element_size()
        page_dims = [d for d in order if d != 0 and size[d] > 1]
        outer = [d for d in page_dims if d not in inner]
        self.num_blocks = blocks // kernel_blocks
        self.regions_per_page = prod(size[d] for d in outer)
        self._run_bytes = kernel_blocks * prod(size[d] for d in page_dims if d in inner) * item
        self.page_bytes = self.regions_per_page * self._run_bytes
        self._region_stride = stride[outer[0]] * item if outer else self._run_bytes
        self._block_stride = kernel_blocks * stride[0] * item
        self._bytes = tensor.view(torch.uint8)

        dims = [f"{_DIMS[d]}{size[d]}" for d in page_dims]
        # a page in kernel blocks whose tokens are not adjacent: bytes in another order than
        # one block of `block_size` tokens in the same layout
        self.split = kernel_blocks > 1 and dims[0][0] != "N"
        if kernel_blocks > 1:  # where N is outermost, kernel blocks are just more tokens
            dims = (
                [f"N{kernel_blocks * tokens}", *dims[1:]]
                if dims[0][0] == "N"
                else [f"K{kernel_blocks}", *dims]
            )
        dtype = layout.cache_dtype if item == 1 else str(tensor.dtype).removeprefix("torch.")
        self.name = ":".join(filter(None, [packing, dtype, "x".join(dims), layout.variant]))

    def regions(self, block_ids: Sequence[int]) -> list[list[torch.Tensor]]:
        """Each block's page as 1-D uint8 views of the layer's memory, in page order."""
        every = self._all()
        return [list(every[b].unbind(0)) for b in self._checked(block_ids)]

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The pages of `block_ids`, packed by one kernel into a new `[n, page_bytes]` uint8
        tensor on the layer's device (one copy, whatever the page's runs)."""
        return self._all().index_select(0, self._ids(block_ids)).view(-1, self.page_bytes)

    def scatter(self, block_ids: Sequence[int], pages: torch.Tensor) -> None:
        """Write `pages` (`[n, page_bytes]` uint8 on the layer's device) into the pages of
        `block_ids`, one kernel; nothing is written unless they are pages of this layer."""
        if pages.dtype != torch.uint8 or tuple(pages.shape) != (len(block_ids), self.page_bytes):
            raise InvalidArgument(
                "pages", f"{pages.dtype} {tuple(pages.shape)}, not {len(block_ids)} pages"
            )
        shaped = pages.view(len(block_ids), self.regions_per_page, self._run_bytes)
        self._all().index_copy_(0, self._ids(block_ids), shaped)

    def _all(self) -> torch.Tensor:
        """[blocks, regions, run bytes] over the whole layer; no copy."""
        return self._bytes.as_strided(
            (self.num_blocks, self.regions_per_page, self._run_bytes),
            (self._block_stride, self._region_stride, 1),
            self._bytes.storage_offset(),
        )

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(self._checked(block_ids), dtype=torch.long).to(self._bytes.device)

    def _checked(self, block_ids: Sequence[int]) -> list[int]:
        """Checked here: an index out of range on a GPU would end its CUDA context."""
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise InvalidArgument("block_ids", f"{bad[0]} is not one of {self.num_blocks} blocks")
        return list(block_ids)

    def _check_description(self) -> str:
        """The backend's packing, once the description is one this module knows."""
        t, layout = self._tensor, self._layout
        packing = PACKINGS.get(layout.backend)
        if packing is None or layout.layout not in LAYOUTS:
            self._refuse(
                f"unknown backend or layout (known: {sorted(PACKINGS)}, {sorted(LAYOUTS)})"
            )
        if layout.cache_dtype not in CACHE_DTYPES:
            self._refuse(f"cache dtype {layout.cache_dtype} (known: {sorted(CACHE_DTYPES)})")
        if (t.element_size() == 1) != layout.cache_dtype.startswith("fp8"):
            self._refuse(f"{t.dtype} elements for cache dtype {layout.cache_dtype}")
        if packing == "kv-rows" and not layout.variant:
            self._refuse("CPU_ATTN pages need the kernel's ISA (variant)")
        if t.dim() != 4 or t.shape[2] == 0 or layout.block_size % t.shape[2]:
            self._refuse(f"not [B, H, N, C] with N dividing {layout.block_size}-token blocks")
        if t.shape[0] % (layout.block_size // t.shape[2]):
            self._refuse("kernel blocks that do not make whole blocks")
        return packing

    def _check_strides(self, order: list[int], inner: set[int], kernel_blocks: int) -> None:
        """Each dim (in the layout's order) must step over all of the next one, and the dims
        of a run must be packed; dims of size 1 have no order to check."""
        size, stride = self._tensor.shape, self._tensor.stride()
        dims = [d for d in order if size[d] > 1]
        if not dims or dims[-1] != 3 or stride[3] != 1:
            self._refuse("content dim C is not packed")
        for outer, nested in itertools.pairwise(dims):
            span = stride[nested] * size[nested]
            if stride[outer] < span or (outer in inner and stride[outer] != span):
                self._refuse(f"dim {_DIMS[outer]} is not laid out as {self._layout.layout}")
        heads_apart = size[1] > 1 and 1 not in inner
        if kernel_blocks > 1 and (heads_apart or stride[0] != prod(size[1:])):
            self._refuse(f"{kernel_blocks} kernel blocks per block that are not adjacent")

    def _refuse(self, reason: str) -> NoReturn:
        t = self._tensor
        raise Unsupported(
            f"vLLM cache {self._layout.backend} {self._layout.layout}: {reason}; layer tensor "
            f"{tuple(t.shape)} strides {t.stride()} {t.dtype}"
        )
