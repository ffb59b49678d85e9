"""SGLang's side of tests/test_sglang.py, run in .venv-sglang: one JSON command a line on
stdin, one JSON answer a line on stdout. Each command runs SGLang's own code (its storage
loader, host pools, fault injector, the cache controller's page calls) on kvstore's backend,
against the daemons the test started; what comes back is what the test asserts on (page
digests, results, whether anything raised)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import traceback
from typing import Any

from kvstore.bench.sglang_bench import (
    BACKEND,
    attach,
    host_pool,
    storage_config,
    without_torchvision,
)

without_torchvision()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheFile,
    HiCacheStorage,
    HiCacheStorageFailureInjector,
)

from kvstore.client import Client  # noqa: E402

GEOMETRY = {"layers": 4, "heads": 2, "head_dim": 64}  # MLA: a latent of 128 + 64 rope dims


class Warnings(logging.Handler):
    """kvstore's warnings in this process, to count how often a failure was logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


warnings = Warnings()
logging.getLogger("kvstore").addHandler(warnings)
backends: dict[str, Any] = {}  # name -> backend (as SGLang holds it: wrapped when injecting)
pools: dict[str, Any] = {}


def open_backend(
    name: str,
    extra: dict,
    layout: str = "page_first",
    mla: bool = False,
    pages: int = 4,
    page_size: int = 16,
    tp_rank: int = 0,
    tp_size: int = 1,
    environ: dict | None = None,
) -> dict:
    """A host pool and the backend SGLang's loader builds for it, with `environ` set while
    it does (SGLang's fault injector goes around it when asked there), given the pool as
    SGLang does."""
    pool = host_pool(layout, pages, page_size, mla=mla, **GEOMETRY)
    config = storage_config({**BACKEND, **extra}, tp_rank=tp_rank, tp_size=tp_size, mla=mla)
    os.environ.update(environ or {})
    try:
        backend = attach("dynamic", config, pool)
    finally:
        for variable in environ or {}:
            del os.environ[variable]
    if isinstance(backend, HiCacheStorageFailureInjector):  # draws from a per-thread
        HiCacheStorageFailureInjector._thread_local.random = random.Random(0)  # generator
    backends[name], pools[name] = backend, pool
    inner = unwrapped(name)
    return {
        "class": f"{type(inner).__module__}.{type(inner).__name__}",
        "wrapper": type(backend).__name__,
        "is_hicache_storage": isinstance(inner, HiCacheStorage),
        "tp_lcm_size": config.tp_lcm_size,
        "page_bytes": inner.pages.nbytes,
    }


def unwrapped(name: str) -> Any:
    """The backend itself, inside SGLang's fault injector if there is one."""
    return getattr(backends[name], "_backend", backends[name])


def fill(name: str, seed: int) -> list[str]:
    data = pools[name].kv_buffer.view(torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=generator))
    return digests(name)


def zero(name: str) -> list[str]:
    pools[name].kv_buffer.zero_()
    return digests(name)


def digests(name: str) -> list[str]:
    """Each page's bytes, digested (as SGLang's generic path reads a page)."""
    pool = pools[name]
    pages = range(0, pool.size, pool.page_size)
    return [
        hashlib.sha256(pool.get_data_page(p).view(torch.uint8).numpy()).hexdigest() for p in pages
    ]


def indices(name: str, pages: list[int]) -> torch.Tensor:
    """The host indices of `pages`, as SGLang's controller passes them: every token slot."""
    size = pools[name].page_size
    return torch.cat([torch.arange(p * size, (p + 1) * size) for p in pages])


def call(name: str, method: str, keys: list[str], pages: list[int] | None = None) -> Any:
    """A backend method as SGLang's cache controller calls it; the flat-page ones (`set`,
    `batch_set`, `get`, `batch_get`) with pages as its generic path takes and writes them."""
    backend, pool = backends[name], pools[name]
    starts = [p * pool.page_size for p in pages or []]
    if method in ("batch_set_v1", "batch_get_v1"):
        return getattr(backend, method)(keys, indices(name, pages or []))
    if method == "batch_exists":
        return backend.batch_exists(keys)
    if method == "exists":
        return backend.exists(keys[0])
    if method in ("batch_set", "set"):
        values = [pool.get_data_page(start) for start in starts]
        if method == "set":
            return backend.set(keys[0], values[0])
        return backend.batch_set(keys, values)
    if method == "get":
        found = [backend.get(keys[0], pool.get_dummy_flat_data_page())]
    else:
        found = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    for start, page in zip(starts, found, strict=True):
        if page is not None:
            pool.set_from_flat_data_page(start, page)
    return [page is not None for page in found]


def put_raw(name: str, keys: list[str], dtype: str, shape: list[int]) -> None:
    """Store zeros of numpy's `dtype` and `shape` under the backend's node keys of `keys`,
    past the backend: what another model or layout could have left there."""
    backend = unwrapped(name)
    with Client(backend.settings.address) as client:
        client.put(backend.node_keys(keys), [np.zeros(shape, np.dtype(dtype))] * len(keys))


def corrupt(name: str, key: str) -> None:
    """Flip a byte of the page stored under `key`, in the node's shared arena."""
    backend = unwrapped(name)
    with Client(backend.settings.address) as client:
        arena = client.shared_arena()
        with client.lease(backend.node_keys([key])) as lease:
            at = lease.blocks[0].ctypes.data - arena.ctypes.data
        arena[at] ^= 0xFF


def suffixes(configs: list[dict], directory: str) -> list[list[str]]:
    """[kvstore's rank suffix, HiCacheFile's] for each storage config."""
    pairs = []
    for options in configs:
        config = storage_config({"file_storage_path": directory}, **options)
        pool = host_pool("page_first", 1, 16, mla=options.get("mla", False), **GEOMETRY)
        ours = attach("dynamic", storage_config(BACKEND, **options), pool)
        pairs.append([ours.suffix, HiCacheFile(config)._get_suffixed_key("")])
        ours.close()
    return pairs


def close(name: str) -> None:
    backends.pop(name).close()
    pools.pop(name)


def logged() -> list[str]:
    return list(warnings.messages)


COMMANDS = {
    f.__name__: f
    for f in (open_backend, fill, zero, digests, call, put_raw, corrupt, suffixes, close, logged)
}


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = {"result": COMMANDS[command.pop("op")](**command)}
        except Exception as exc:  # reported to the test, which decides
            answer = {"raised": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
