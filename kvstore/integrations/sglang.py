"""kvstore under SGLang's HiCache (0.5.23): a storage backend SGLang loads by module path,

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
    '{"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
      "class_name": "KVStoreHiCache", "interface_v1": 1, "address": "127.0.0.1:7600"}'

Each page of SGLang's host KV pool (`page_size` tokens, every layer, K and V, or MLA's one
latent) is one kvstore block, its bytes as the pool lays them out: what SGLang's own
`get_data_page(index, flat=False)` views. In `page_first` a page is two runs of the pool's
memory (K, V), in `layer_first` two per layer; numpy views over the pool gather them into a
block and scatter a block back, one vectorised copy per page. A request's pages move in one
batched client call: on the node's host through its shared arena, straight from and into the
pool (one copy each way), elsewhere over its TCP data plane or NIXL through a staging buffer.

Keys: SGLang's 64-hex page hash plus the rank suffix its file backend appends (model, TP
rank and size for MHA; the model alone for MLA, whose ranks hold the same KV and where only
the storage writer writes), hashed into a 16-byte key salted with the tenant, dtype, layout
and page shape, so pages of another layout or model are never loaded as garbage.

The node never reaches SGLang's cache controller as an exception: a node down, slow or
wrong is a miss (False, None, 0), logged once, and the node is left alone for
`retry_after_s` before it is tried again (`NodeGuard`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvstore.client.client import TRANSPORTS
from kvstore.errors import CorruptBlock
from kvstore.integrations.common import (
    NodeGuard,
    as_numpy,
    as_tensor,
    check_settings,
    numpy_dtype,
    verified_prefix,
)
from kvstore.keys import name_key, namespace_salt

log = logging.getLogger("kvstore.integrations.sglang")
T = TypeVar("T")
ENVIRONMENT = {"address": "KVSTORE_ADDRESS", "tenant": "KVSTORE_TENANT", "token": "KVSTORE_TOKEN"}


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """kvstore's keys of `--hicache-storage-backend-extra-config` (SGLang's own keys in the
    same object are left to it). Each of `address`, `tenant` and `token` falls back to its
    environment variable (`ENVIRONMENT`), then to the default.

    - `address`: the kvstore node on this host (HOST:PORT of its gRPC port).
    - `tenant`: names the key space within the node's: deployments of different tenants
      never share a page, even on a node without `--auth-file`.
    - `token`: the tenant's token where the node requires one.
    - `transport`: `auto` (shared memory on the node's host, else NIXL or TCP), or one path.
    - `timeout_s`: the longest one call to the node may take before it is a miss.
    - `retry_after_s`: after a failure, every call misses this long without trying.
    """

    address: str = "127.0.0.1:7600"
    tenant: str = ""
    token: str = ""
    transport: str = "auto"
    timeout_s: float = 5.0
    retry_after_s: float = 10.0

    def __post_init__(self) -> None:
        check_settings(
            self.transport, TRANSPORTS, timeout_s=self.timeout_s, retry_after_s=self.retry_after_s
        )

    @classmethod
    def from_extra(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ
    ) -> BackendConfig:
        values: dict[str, Any] = {n: environ[v] for n, v in ENVIRONMENT.items() if v in environ}
        values.update({n: value for n, value in (extra or {}).items() if n in cls.__slots__})
        return cls(**values)


def rank_suffix(config: HiCacheStorageConfig) -> str:
    """What SGLang's file backend (`HiCacheFile`) appends to a page hash for this rank:
    MLA ranks share pages, MHA ranks (and pipeline and context-parallel shards) do not."""
    model = "-".join(config.model_name.split("/")) if config.model_name else ""
    shard = f"_{config.pp_size}_{config.pp_rank}" if config.pp_size > 1 else ""
    if config.attn_cp_size > 1:
        shard += f"_cp{config.attn_cp_rank}_{config.attn_cp_size}"
    if config.is_mla_model:
        suffix = f"_{model}{shard}"
    else:
        suffix = f"_{model}_{config.tp_rank}_{config.tp_size}{shard}"
    dcp_size = getattr(config, "dcp_size", 1)
    if dcp_size > 1:
        suffix += (
            f"_tp{config.tp_size}_dcp{config.dcp_rank}_{dcp_size}_page{config.logical_page_size}"
        )
    return suffix


class HostPages:
    """SGLang's host KV pool seen page by page: numpy views of its own memory (no copy),
    pages copied on `copier`'s threads at once (copies release the GIL)."""

    def __init__(self, pool: Any, copier: Executor) -> None:
        self.pool = pool
        self._copier = copier
        first = pool.get_data_page(0, flat=False)
        self.dtype = numpy_dtype(first.dtype)
        self.shape = tuple(first.shape)
        self.nbytes = first.numel() * first.element_size()
        self.page_size: int = pool.page_size

    def salt(self, tenant: str) -> bytes:
        return namespace_salt(
            engine="sglang", tenant=tenant, dtype=str(self.dtype), layout=self.pool.layout,
            shape=self.shape,
        )  # fmt: skip

    def starts(self, host_indices: torch.Tensor, pages: int) -> list[int]:
        """The first token slot of each of `pages` pages, or ValueError."""
        if host_indices.numel() != pages * self.page_size:
            raise ValueError(
                f"{host_indices.numel()} host indices for {pages} pages of {self.page_size}"
            )
        return host_indices[:: self.page_size].tolist()

    def view(self, start: int) -> np.ndarray:
        """The bytes of the page at token slot `start`, in the pool's own memory."""
        return as_numpy(self.pool.get_data_page(start, flat=False)).view(np.uint8)

    def gather(self, starts: Sequence[int], blocks: Sequence[np.ndarray]) -> None:
        """Copy the page at `starts[i]` into `blocks[i]` (its bytes, any dtype and shape)."""
        list(self._copier.map(self._gather, starts, blocks))

    def scatter(self, blocks: Sequence[np.ndarray], starts: Sequence[int]) -> None:
        list(self._copier.map(self._scatter, blocks, starts))

    def _gather(self, start: int, block: np.ndarray) -> None:
        page = self.view(start)
        np.copyto(block.reshape(-1).view(np.uint8).reshape(page.shape), page)

    def _scatter(self, block: np.ndarray, start: int) -> None:
        page = self.view(start)
        np.copyto(page, block.reshape(-1).view(np.uint8).reshape(page.shape))

    def as_block(self, memory: np.ndarray) -> np.ndarray:
        """`memory` (a page's bytes) as the block it is stored as: dtype and shape."""
        return memory.view(self.dtype).reshape(self.shape)


class Staging:
    """A buffer reused by one call at a time (fresh memory costs page faults, more than the
    copy into it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = np.empty(0, np.uint8)

    @contextmanager
    def take(self, nbytes: int) -> Iterator[np.ndarray]:
        with self._lock:
            if len(self._buffer) < nbytes:
                self._buffer = np.empty(nbytes, np.uint8)
            yield self._buffer[:nbytes]


class KVStoreHiCache(HiCacheStorage):
    """SGLang's HiCache storage backend over one kvstore node; thread-safe (SGLang's backup
    and prefetch threads call it at once). Built as SGLang's dynamic loader builds it,
    `KVStoreHiCache(storage_config, kwargs)`; its pages are known once SGLang registers its
    host pool, and until then every call misses."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.settings = BackendConfig.from_extra(storage_config.extra_config)
        self.suffix = rank_suffix(storage_config)
        self.writes = storage_config.is_storage_writer  # MLA: one rank writes for all
        self.guard = NodeGuard(
            self.settings.address,
            "sglang",
            self.settings.retry_after_s,
            transport=self.settings.transport,
            timeout=self.settings.timeout_s,
            token=self.settings.token,
        )
        self.pages: HostPages | None = None
        self._salt = b""
        self._saves, self._loads = Staging(), Staging()
        self._copier = ThreadPoolExecutor(min(8, os.cpu_count() or 1), "kvstore-sglang-copy")

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.pages = HostPages(mem_pool_host, self._copier)
        self._salt = self.pages.salt(self.settings.tenant)

    # -- the zero-copy interface (`"interface_v1": 1`) -------------------------------------

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        """Store the pages at `host_indices` under `keys`, all in one put. On an MLA rank
        that is not the storage writer, True without writing: the writer stores them."""
        if not self.writes or not keys:
            return [True] * len(keys)
        stored = self._guarded("save", lambda pages: self._save(pages, keys, host_indices), False)
        return [stored] * len(keys)

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        """Load the present, verified prefix of `keys` into the pages at `host_indices`; no
        page past that prefix is written."""
        if not keys:
            return []
        loaded = self._guarded("load", lambda pages: self._load(pages, keys, host_indices), 0)
        return [i < loaded for i in range(len(keys))]

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages the node holds: one lookup."""
        if not keys:
            return 0
        return self._guarded("lookup", lambda _: self.guard.client.lookup(self.node_keys(keys)), 0)

    # -- the legacy interface: pages as flat tensors ---------------------------------------

    def get(
        self, key: str, target_location: Any = None, target_sizes: Any = None
    ) -> torch.Tensor | None:
        targets = None if target_location is None else [target_location]
        return self.batch_get([key], targets)[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        """The present, verified prefix of `keys`, copied into `target_locations` (flat
        tensors of a page each) or new tensors; None from the first page missing."""
        if not keys:
            return []
        found: list[torch.Tensor] = self._guarded(
            "load", lambda pages: self._get_flat(pages, keys, target_locations), []
        )
        return [*found, *[None] * (len(keys) - len(found))]

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        """Store flat page tensors (`get_data_page(index)`), all in one put."""
        if not self.writes or not keys:
            return True
        return self._guarded("save", lambda pages: self._put_flat(pages, keys, values), False)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def close(self) -> None:
        self.guard.close()
        self._copier.shutdown(wait=False)

    # -- moving pages ----------------------------------------------------------------------

    def _guarded(self, doing: str, call: Callable[[HostPages], T], fallback: T) -> T:
        """`call(pages)`, or `fallback` when it fails or the node is being left alone."""
        pages = self.pages
        if pages is None:
            log.warning("kvstore: %s before SGLang registered its host pool: a miss", doing)
            return fallback

        def attempt() -> T:
            try:
                return call(pages)
            except CorruptBlock as exc:  # a page's bytes, not the node: this request misses
                log.warning("kvstore %s: %s: a miss", self.settings.address, exc)
                return fallback

        return self.guard.call(doing, attempt, fallback)

    def node_keys(self, keys: Sequence[str]) -> list[bytes]:
        """The node's keys of SGLang's page keys (for tools that delete or inspect them)."""
        return [name_key(f"{key}{self.suffix}", self._salt) for key in keys]

    def _save(self, pages: HostPages, keys: list[str], host_indices: torch.Tensor) -> bool:
        starts = pages.starts(host_indices, len(keys))
        client = self.guard.client
        if client.shared_arena() is not None:  # the node's host: straight into its arena

            def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
                pages.gather([starts[i] for i in indexes], slots)  # one copy: pool -> arena

            client.put_in_place(self.node_keys(keys), pages.dtype, pages.shape, fill)
            return True
        with self._saves.take(len(starts) * pages.nbytes) as staging:
            blocks = [pages.as_block(part) for part in np.split(staging, len(starts))]
            pages.gather(starts, blocks)  # one copy: pool -> staging, then the socket's
            client.put(self.node_keys(keys), blocks)
        return True

    def _load(self, pages: HostPages, keys: list[str], host_indices: torch.Tensor) -> int:
        starts = pages.starts(host_indices, len(keys))
        client = self.guard.client
        if client.shared_arena() is not None:  # the node's host: straight from its arena
            with client.lease(self.node_keys(keys)) as lease:  # checksums checked when taken
                written = self._write(pages, lease.blocks, starts)
                return written if lease.active else 0  # else ended mid-copy: maybe not ours
        with self._loads.take(len(starts) * pages.nbytes) as staging:
            blocks = client.get(self.node_keys(keys), out=staging)  # checksums checked
            return self._write(pages, blocks, starts)

    def _write(self, pages: HostPages, blocks: Sequence[np.ndarray], starts: list[int]) -> int:
        """Scatter the leading blocks that are pages of this pool (dtype and shape) into it;
        how many were written."""
        good = verified_prefix(blocks[: len(starts)], pages.dtype, pages.shape)
        pages.scatter(blocks[:good], starts)  # one copy: arena (or staging) -> pool
        return good

    def _get_flat(
        self, pages: HostPages, keys: list[str], targets: Sequence[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        blocks = self.guard.client.get(self.node_keys(keys))
        good = verified_prefix(blocks, pages.dtype, pages.shape)
        found = []
        for i, block in enumerate(blocks[:good]):
            if targets is None:
                found.append(as_tensor(block, pages.pool.dtype).flatten())
                continue
            target = targets[i]
            if target.numel() * target.element_size() != pages.nbytes:
                break  # not a page of this pool: a miss from here
            target.view(torch.uint8).numpy()[:] = block.reshape(-1).view(np.uint8)
            found.append(target)
        return found

    def _put_flat(self, pages: HostPages, keys: list[str], values: Sequence[torch.Tensor]) -> bool:
        blocks = []
        for value in values:
            if value.numel() * value.element_size() != pages.nbytes:
                raise ValueError(f"a page of {pages.nbytes} bytes, got {value.numel()} values")
            blocks.append(pages.as_block(as_numpy(value.contiguous()).reshape(-1).view(np.uint8)))
        self.guard.client.put(self.node_keys(keys), blocks)
        return True
