"""vLLM's paged KV cache as the connector moves it: one page per (layer, block), as is.

vLLM 0.32 gives each attention layer a tensor `[num_blocks, heads, block_size, C]` (its
logical `[B, H, N, C]`), and on CPU one page, `t[block]`, is one contiguous run of bytes
(196,608 for SmolLM2 at block size 128 in float32; K stored transposed, then V). A page is
what one layer's attention reads for one block, so it is the unit of the per-layer waits, and
moving its bytes unchanged costs one copy each way and no transposes. The bytes are only
meaningful to an engine with the same dtype, block size and page layout, which is why those
are in the keys' salt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from kvstore.client import Client
from kvstore.client.shm import Fill
from kvstore.errors import Unsupported
from kvstore.integrations.common import as_numpy, verified_prefix


class PageCache(Protocol):
    """What saves and loads ask of an engine's cache, on the CPU (`Pages`) or a GPU
    (`gpu_pages.GpuPages`): a page's dtype, shape and size, and its pages by layer."""

    by_name: dict[str, int]
    layers: list[int]
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int

    def attach(self, client: Client) -> bool: ...

    def computed(self, layer: int) -> None: ...

    def loading(self) -> None: ...

    def views(self, layer: int, block_ids: Sequence[int]) -> list[np.ndarray]: ...

    def fill(self, layer: int, block_ids: Sequence[int]) -> Fill: ...

    def write(self, layer: int, block_ids: Sequence[int], arrays: Sequence[np.ndarray]) -> int: ...


class Pages:
    """Every registered layer's pages, as numpy views of vLLM's own memory (no copy)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], layer_index: Callable[[str], int]):
        self.by_name: dict[str, int] = {}
        self._arrays: dict[int, np.ndarray] = {}
        for name, tensor in kv_caches.items():
            if tensor.device.type != "cpu" or not tensor[0].is_contiguous():
                raise Unsupported(
                    f"{name}: kvstore's vLLM connector moves CPU caches whose pages are "
                    f"contiguous; got {tensor.device} with strides {tensor.stride()}"
                )
            layer = layer_index(name)
            self.by_name[name] = layer
            self._arrays[layer] = as_numpy(tensor)
        first = next(iter(self._arrays.values()))
        self.dtype: np.dtype = first.dtype
        self.shape: tuple[int, ...] = tuple(first.shape[1:])
        self.nbytes = first[0].nbytes  # of one page
        self.layers = sorted(self._arrays)

    def attach(self, client: Client) -> bool:
        """Whether the node shares this host (in-place saves and leased loads)."""
        return client.shared_arena() is not None

    def computed(self, layer: int) -> None:
        """A layer's pages are final once vLLM hands it over: nothing to record on a CPU."""

    def loading(self) -> None:
        """Loads start after what the forward pass did: in order on a CPU."""

    def views(self, layer: int, block_ids: Sequence[int]) -> list[np.ndarray]:
        """The pages of `block_ids` in layer `layer`, as they are now (what a put sends)."""
        pages = self._arrays[layer]
        return [pages[b] for b in block_ids]

    def fill(self, layer: int, block_ids: Sequence[int]) -> Callable[..., None]:
        """A `put_in_place` fill: copies page `block_ids[i]` into the slot of block i."""
        pages = self._arrays[layer]

        def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
            for i, slot in zip(indexes, slots, strict=True):
                np.copyto(slot.view(self.dtype).reshape(self.shape), pages[block_ids[i]])

        return fill

    def write(self, layer: int, block_ids: Sequence[int], arrays: Sequence[np.ndarray]) -> int:
        """Copy `arrays[i]` into page `block_ids[i]`, in order, up to the first array that is
        not a page of this cache (another dtype or shape: never loaded as garbage); returns
        how many were copied."""
        pages = self._arrays[layer]
        good = verified_prefix(arrays[: len(block_ids)], self.dtype, self.shape)
        for block_id, array in zip(block_ids, arrays[:good], strict=False):
            np.copyto(pages[block_id], array)  # one copy: node (or staging) -> page
        return good
