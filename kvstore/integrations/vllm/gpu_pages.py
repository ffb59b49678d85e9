"""vLLM's paged KV cache in GPU memory, moved without stalling the forward pass (torch only, no
vLLM: the GPU machine tests it with tensors laid out as vLLM's GPU backends lay them).

The same calls as `Pages` (CPU caches), for the saver thread and the loads' fetching threads:

- **Saves.** `computed(layer)` records a CUDA event on the compute stream as vLLM hands a
  layer over (`save_kv_layer`); the saver's stream waits on that event only, never the
  compute stream on the saver. One gather kernel packs the saved pages of a layer (one page
  is one or a few runs of the layer tensor: `layouts.LayerPages`), then one DMA per run of
  adjacent slots writes them straight into the node's arena, page-locked once, on the same
  host (`fill`), or into pinned staging for a put over TCP or NIXL (`views`).
- **Loads.** `write` copies a layer's arrived pages (leased in the arena, or received into
  pinned staging) to the device in one DMA per run, scatters them into their blocks with one
  kernel on the loading stream, and waits for that stream before returning, in the fetching
  thread: once `wait_for_layer_load(l)` sees layer l arrived, its pages are in place, and the
  compute stream never waited on anything but that layer.

Pages are checked before they are written (dtype and size: `verified_prefix`; checksums by the
client as they arrive), and a layer is written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvstore.client.client import Client
from kvstore.client.shm import Fill
from kvstore.errors import Unsupported
from kvstore.integrations.common import (
    HostStaging,
    arena_fill,
    copy_from_arena,
    locked_arena,
    verified_prefix,
    whole_buffer,
)
from kvstore.integrations.vllm.layouts import CacheLayout, LayerPages


class GpuPages:
    """Every registered layer's pages in GPU memory (one device), for one worker."""

    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        layer_index: Callable[[str], int],
        layout: CacheLayout,
    ) -> None:
        devices = {tensor.device for tensor in kv_caches.values()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise Unsupported(f"GPU pages: the layers lie on {sorted(map(str, devices))}")
        self.device = next(iter(devices))
        self.by_name = {name: layer_index(name) for name in kv_caches}
        self._layers = {self.by_name[n]: LayerPages(t, layout) for n, t in kv_caches.items()}
        first = next(iter(self._layers.values()))
        if len({(p.page_bytes, p.name) for p in self._layers.values()}) != 1:
            raise Unsupported("GPU pages: layers whose pages differ in size or layout")
        if first.split:  # the keys name the layout, not the kernels' block size
            raise Unsupported(
                f"GPU pages: {first.name}: blocks of {layout.block_size} tokens split into "
                f"kernel blocks inside a page; use a block size the kernels take whole"
            )
        self.layers = sorted(self._layers)
        self.nbytes = first.page_bytes
        self.dtype: np.dtype = np.dtype(np.uint8)  # pages move as bytes
        self.shape: tuple[int, ...] = (self.nbytes,)
        self._computed: dict[int, torch.cuda.Event] = {}
        self._allocated: torch.cuda.Event | None = None  # loads land after this
        self._saving = torch.cuda.Stream(self.device)
        self._loading = torch.cuda.Stream(self.device)
        self._staging = HostStaging()  # the saver's (one thread)
        self._arena: np.ndarray | None = None

    def attach(self, client: Client) -> bool:
        """Page-lock the node's arena here if it shares the host (in-place saves and
        leased loads then move by DMA alone); whether it does. On this cache's device: a
        thread's default one would make a CUDA context on another GPU."""
        with torch.cuda.device(self.device):
            self._arena = locked_arena(client)
        return self._arena is not None

    # -- saves: in the saver thread ------------------------------------------------------

    def computed(self, layer: int) -> None:
        """In the compute thread, as vLLM hands layer `layer` over: its pages are final once
        the compute stream reaches this point."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._computed[layer] = event

    def fill(self, layer: int, block_ids: Sequence[int]) -> Fill:
        """A `put_in_place` fill: the pages of `block_ids`, gathered once, each run of
        adjacent slots of the (page-locked) arena written in one DMA."""
        assert self._arena is not None, "in-place saves need the node's arena (attach)"
        with torch.cuda.stream(self._saving):
            inner = arena_fill(self._gather(layer, block_ids), len(block_ids), self._arena)

        def fill(indexes: list[int], slots: list[np.ndarray]) -> Callable[[], None] | None:
            with torch.cuda.stream(self._saving):
                return inner(indexes, slots)  # the client publishes once it returned

        return fill

    def views(self, layer: int, block_ids: Sequence[int]) -> list[np.ndarray]:
        """The pages of `block_ids` in pinned host memory (valid until the next call), for a
        put over the network."""
        gathered = self._gather(layer, block_ids)
        host = self._staging.take(gathered.numel(), self.device)
        with torch.cuda.stream(self._saving):
            host.copy_(gathered.view(-1), non_blocking=True)
        self._saving.synchronize()
        return list(host.numpy().reshape(len(block_ids), self.nbytes))

    def _gather(self, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
        """[len(block_ids), page bytes] on the device, packed by one kernel on the saving
        stream once the layer is computed."""
        if (event := self._computed.get(layer)) is not None:
            self._saving.wait_event(event)
        with torch.cuda.stream(self._saving):
            return self._layers[layer].gather(block_ids)

    # -- loads: in a fetching thread -----------------------------------------------------

    def loading(self) -> None:
        """In the compute thread, as a step's loads start: what the compute stream does to
        their blocks before this point (vLLM zeroes new blocks there) lands before them."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._allocated = event

    def write(self, layer: int, block_ids: Sequence[int], arrays: Sequence[np.ndarray]) -> int:
        """Copy `arrays[i]` (host memory) into the page of `block_ids[i]`, up to the first
        array that is not a page of this cache; returns how many were written, all of
        them in place when it returns."""
        good = verified_prefix(arrays[: len(block_ids)], self.dtype, self.shape)
        if not good:
            return 0
        # leased in the arena, or received into the load's (pinned) staging buffer
        arena = self._arena
        within = (
            arena if arena is not None and _inside(arrays[0], arena) else whole_buffer(arrays[0])
        )
        if self._allocated is not None:
            self._loading.wait_event(self._allocated)
        with torch.cuda.stream(self._loading):
            pages = torch.empty(good * self.nbytes, dtype=torch.uint8, device=self.device)
            copy_from_arena(within, arrays[:good], pages, 0)  # one DMA per run
            self._layers[layer].scatter(block_ids[:good], pages.view(good, self.nbytes))
        self._loading.synchronize()  # the host memory may be reused from here on
        return good


def _inside(array: np.ndarray, arena: np.ndarray) -> bool:
    return 0 <= array.ctypes.data - arena.ctypes.data < arena.nbytes
