"""Engine adapter: a request's KV for all layers <-> kvstore blocks (needs torch).

One block holds every layer's K and V for `block_size` tokens, laid out
`[tokens, layers, kv, heads, dim]` (recorded in each block's metadata). The
namespace salt names the model, its weights' identity (`kvstore.weights`: a
fingerprint of the checkpoint's files, the config's rope settings), dtype, layout
and block size, so KV stored under one model, checkpoint or layout is never found
under another; a block whose recorded shape or dtype still disagrees is an error,
never loaded as garbage.

Two cache shapes are supported:
- Hugging Face `transformers` caches (`DynamicCache`: per layer `[batch, heads,
  tokens, dim]`), batch size 1;
- paged caches as engines keep them: per layer `[num_pages, 2, page_size, heads,
  dim]` with a block table mapping a request's blocks to page ids, `page_size ==
  block_size`.
On a GPU, gather and scatter run on the device. With the node on the same host,
the device copies blocks straight into their slots of the node's shared arena
(page-locked once) and loads them straight from there: one DMA per run of
adjacent blocks, no host copy. Otherwise the host side is one batched copy
through a pinned staging buffer in each direction. Both paths are the engine adapters'
shared GPU staging (`kvstore.integrations.common`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvstore.client.client import IN_PLACE_PART, Client
from kvstore.errors import InvalidArgument
from kvstore.integrations.common import (
    HostStaging,
    arena_fill,
    as_tensor,
    check_blocks,
    copy_from_arena,
    locked_arena,
    numpy_dtype,
)
from kvstore.keys import block_keys, namespace_salt
from kvstore.results import PutResult
from kvstore.weights import local_checkpoint, model_identity

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel

LAYOUT = "tokens,layers,kv,heads,dim"


@dataclass(frozen=True)
class KVSpec:
    """What a model's KV looks like."""

    model_id: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 256
    weights_id: str = ""  # what identifies the computation: `weights_identity`

    @classmethod
    def of(
        cls,
        model: PreTrainedModel,
        model_id: str,
        block_size: int = 256,
        weights_id: str | None = None,
    ) -> KVSpec:
        """The spec of a `transformers` causal LM. `weights_id` names its weights instead of
        their fingerprint (see `weights_identity`)."""
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        identity = weights_identity(model, weights_id)
        return cls(
            model_id, config.num_hidden_layers, heads, head_dim, model.dtype, block_size, identity
        )

    @property
    def salt(self) -> bytes:
        return namespace_salt(
            model=self.model_id,
            weights=self.weights_id,
            dtype=str(self.dtype),
            layout=LAYOUT,
            block_size=self.block_size,
        )

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.block_size, self.layers, 2, self.kv_heads, self.head_dim)


def weights_identity(model: PreTrainedModel, weights_id: str | None = None) -> str:
    """What identifies a `transformers` model's computation (`kvstore.weights.model_identity`,
    as vLLM's connector does): the fingerprint of the checkpoint it was loaded from
    (`config._name_or_path`, a local directory or the hub cache's snapshot), else its hub
    commit; `weights_id` replaces both. Then its config's rope settings and quantization."""
    config = model.config
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    revision = getattr(config, "_commit_hash", None)
    path = local_checkpoint(name, revision) if name and not weights_id else None
    quantization = getattr(config, "quantization_config", None)
    return model_identity(
        weights_id=weights_id,
        path=path or name or None,
        revision=revision,
        config=config,
        extra={"quantization_config": quantization},
    )


class KVAdapter:
    """Stores and loads a request's KV through a `Client`, block by block."""

    def __init__(self, client: Client, spec: KVSpec, codec: str | None = None) -> None:
        self.client = client
        self.spec = spec
        self.codec = codec
        self._staging = HostStaging()

    def keys(self, token_ids: Sequence[int] | np.ndarray) -> list[bytes]:
        return block_keys(np.asarray(token_ids), self.spec.block_size, self.spec.salt)

    def cached_tokens(self, token_ids: Sequence[int] | np.ndarray) -> int:
        """How many leading tokens of the prompt have their KV stored."""
        keys = self.keys(token_ids)
        return self.client.lookup(keys) * self.spec.block_size if keys else 0

    # -- transformers caches ---------------------------------------------------------

    def store_cache(
        self, token_ids: Sequence[int] | np.ndarray, cache: DynamicCache
    ) -> PutResult | None:
        """Store the full blocks of `cache`, which holds the KV of `token_ids` (from the start)."""
        from transformers.cache_utils import CacheLayerMixin

        kv = []
        for layer in cache.layers:  # a linear-attention layer has no K and V to store
            if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
                raise InvalidArgument("cache", "every layer must hold attention keys and values")
            kv.append(torch.stack([layer.keys[0], layer.values[0]]))
        tokens = torch.stack(kv).permute(3, 0, 1, 2, 4)  # [tokens, layers, kv, heads, dim]
        return self._store(token_ids, tokens)

    def load_cache(
        self,
        token_ids: Sequence[int] | np.ndarray,
        config: PreTrainedConfig,
        device: str | torch.device = "cpu",
    ) -> tuple[DynamicCache | None, int]:
        """A `DynamicCache` of the longest stored prefix of the prompt, and its length."""
        from transformers import DynamicCache

        kv = self._load(token_ids, device)
        if kv is None:
            return None, 0
        cache = DynamicCache(config=config)
        for layer in range(self.spec.layers):
            k = kv[:, layer, 0].permute(1, 0, 2).unsqueeze(0)
            v = kv[:, layer, 1].permute(1, 0, 2).unsqueeze(0)
            cache.update(k, v, layer)  # the cache's own concatenation is the one copy
        return cache, kv.shape[0]

    # -- paged caches ----------------------------------------------------------------

    def store_pages(
        self,
        token_ids: Sequence[int] | np.ndarray,
        pages: Sequence[torch.Tensor],
        block_table: Sequence[int],
    ) -> PutResult | None:
        """Store the full blocks of a request whose KV lies in `pages` (one tensor per layer,
        `[num_pages, 2, page_size, heads, dim]`) at the page ids of `block_table`."""
        n = min(len(block_table), len(token_ids) // self.spec.block_size)
        tokens = self.gather_pages(pages, block_table[:n])
        return self._store(token_ids[: n * self.spec.block_size], tokens)

    def gather_pages(
        self, pages: Sequence[torch.Tensor], block_table: Sequence[int]
    ) -> torch.Tensor:
        """The KV of the pages in `block_table`, token-major, gathered on their device."""
        ids = torch.as_tensor(list(block_table), device=pages[0].device)
        gathered = torch.stack([layer.index_select(0, ids) for layer in pages])
        return gathered.permute(1, 3, 0, 2, 4, 5).reshape(-1, *self.spec.block_shape[1:])

    def to_host(self, tokens: torch.Tensor) -> np.ndarray:
        """`tokens` copied once, in one batch, into the reused host staging buffer (pinned
        for a GPU), as numpy without a further copy. Valid until the next call."""
        return self._staging.to_host(tokens)

    def load_pages(
        self,
        token_ids: Sequence[int] | np.ndarray,
        pages: Sequence[torch.Tensor],
        block_table: Sequence[int],
    ) -> int:
        """Scatter the longest stored prefix into the request's pages; returns its length."""
        kv = self._load(token_ids[: len(block_table) * self.spec.block_size], pages[0].device)
        if kv is None:
            return 0
        n = kv.shape[0] // self.spec.block_size
        ids = torch.as_tensor(list(block_table[:n]), device=pages[0].device)
        blocks = kv.reshape(
            n, self.spec.block_size, self.spec.layers, 2, self.spec.kv_heads, self.spec.head_dim
        )
        for layer, page in enumerate(pages):  # [n, 2, page, heads, dim] per layer
            page.index_copy_(0, ids, blocks[:, :, layer].permute(0, 2, 1, 3, 4))
        return kv.shape[0]

    # -- the common part -------------------------------------------------------------

    def _store(
        self, token_ids: Sequence[int] | np.ndarray, tokens: torch.Tensor
    ) -> PutResult | None:
        keys = self.keys(token_ids)[: tokens.shape[0] // self.spec.block_size]
        if not keys:
            return None
        size = self.spec.block_size
        tokens = tokens[: len(keys) * size]
        if tokens.is_cuda and not self.codec and (arena := locked_arena(self.client)) is not None:
            fill = arena_fill(tokens, len(keys), arena)
            dtype = numpy_dtype(self.spec.dtype)
            return self.client.put_in_place(keys, dtype, self.spec.block_shape, fill, layout=LAYOUT)
        host = self.to_host(tokens)  # one copy for all blocks
        blocks = [host[i * size : (i + 1) * size] for i in range(len(keys))]
        return self.client.put(keys, blocks, codec=self.codec, layout=LAYOUT)

    def _load_in_place(
        self, keys: list[bytes], device: torch.device, arena: np.ndarray
    ) -> torch.Tensor | None:
        """Each run of adjacent blocks in the node's arena goes to the device in one DMA.
        Blocks are leased in parts, so one part's copies overlap the next part's lease."""
        block_bytes = int(np.prod(self.spec.block_shape)) * numpy_dtype(self.spec.dtype).itemsize
        part = max(1, IN_PLACE_PART // block_bytes)
        kv = torch.empty(len(keys) * block_bytes, dtype=torch.uint8, device=device)
        at = 0
        with ExitStack() as leases:
            for start in range(0, len(keys), part):
                lease = leases.enter_context(self.client.lease(keys[start : start + part]))
                self._check(lease.blocks, start)
                at = copy_from_arena(arena, lease.blocks, kv, at)
                if len(lease.blocks) < part:
                    break
            torch.cuda.synchronize(device)  # before the leases let the node reuse the slots
        if not at:
            return None
        return kv[:at].view(self.spec.dtype).view(-1, *self.spec.block_shape[1:])

    def _check(self, blocks: Sequence[np.ndarray], first: int = 0) -> None:
        check_blocks(blocks, numpy_dtype(self.spec.dtype), self.spec.block_shape, first)

    def _load(
        self, token_ids: Sequence[int] | np.ndarray, device: str | torch.device
    ) -> torch.Tensor | None:
        keys = self.keys(token_ids)
        if not keys:
            return None
        device = torch.device(device)
        if device.type == "cuda" and (arena := locked_arena(self.client)) is not None:
            return self._load_in_place(keys, device, arena)
        block_bytes = int(np.prod(self.spec.block_shape)) * numpy_dtype(self.spec.dtype).itemsize
        staging = self._staging.take(len(keys) * block_bytes, device)
        out = staging.numpy()
        blocks = self.client.get(keys, out=out)  # received straight into place
        if not blocks:
            return None
        self._check(blocks)
        if np.shares_memory(blocks[0], out):  # back to back in the staging buffer
            kv = staging[: len(blocks) * block_bytes].view(self.spec.dtype)
        else:  # decoded blocks are arrays of their own
            kv = as_tensor(np.concatenate(blocks), self.spec.dtype)
        kv = kv.view(-1, *self.spec.block_shape[1:])
        # blocking: the staging buffer is reused by the next call, so the copy must be done
        return kv.to(device) if kv.device != torch.device(device) else kv
