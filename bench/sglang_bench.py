"""kvstore-bench sglang: SGLang's HiCache moving a request's pages between its host KV pool
and storage through kvstore's backend (`kvstore.integrations.sglang`): `batch_set_v1` and
`batch_get_v1` of `--pages` pages, on the node's host (shared memory) and over TCP, against
a copy of the same bytes in memory (the ceiling), raw TCP (the ceiling of the TCP rows) and
SGLang's own file backend (`HiCacheFile`, called as SGLang's cache controller calls it) in
the same run. Each model is a real host pool of its KV shape (bfloat16).

SGLang's side runs in .venv-sglang (tests/setup_sglang.sh), started from here as
`python -m kvstore.bench.sglang_bench --engine`; its pool and backend builders below serve
tests/sglang_driver.py too.
"""

from __future__ import annotations

import argparse
import enum
import json
import subprocess
import sys
import tempfile
import time
import types
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench import ceilings
from kvstore.bench.measure import Run, Workload
from kvstore.bench.report import Row
from kvstore.config import format_size

HELP = "SGLang HiCache: kvstore's batch_set_v1/batch_get_v1 against memcpy and HiCacheFile"
PYTHON = Path(__file__).resolve().parents[1] / ".venv-sglang" / "bin" / "python"
MODELS = {  # the KV's shape: layers, KV heads, head dim (K and V, bfloat16)
    "smollm2-135m": (30, 3, 64),
    "llama-3-8b": (32, 8, 128),
}
LAYOUTS = ("page_first", "page_first_direct", "layer_first")
BACKEND = {
    "backend_name": "kvstore",
    "module_path": "kvstore.integrations.sglang",
    "class_name": "KVStoreHiCache",
    "interface_v1": 1,
}
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M"


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--pages", type=int, default=64, help="pages per request")
    parser.add_argument("--page-size", type=int, default=64, help="tokens per page")
    parser.add_argument("--models", type=choices(MODELS), default=list(MODELS))
    parser.add_argument("--layout", choices=LAYOUTS, default="page_first")
    parser.add_argument("--python", type=Path, default=PYTHON, help="SGLang's environment")


def check(args: argparse.Namespace) -> str:
    if not args.python.exists():
        return f"{args.python} is missing: run tests/setup_sglang.sh"
    if args.pages < 1 or args.page_size < 1:
        return "--pages, --page-size: >= 1"
    per_token = max(
        4 * layers * heads * dim for layers, heads, dim in map(MODELS.__getitem__, args.models)
    )
    if args.address is None and args.pages * args.page_size * per_token > 1 << 30:
        return "a request of more than 1 GiB: pass --address of a node with room for it"
    return ""


def run(args: argparse.Namespace, procs: Any, address: str, progress: Any, task: Any) -> list[Row]:
    """SGLang's side in its own environment, then the raw TCP ceiling here, per model."""
    progress.update(task, total=2 * len(args.models), description="SGLang's side")
    spec = {
        "address": address,
        "pages": args.pages,
        "page_size": args.page_size,
        "models": args.models,
        "layout": args.layout,
        "repeat": args.repeat,
        "seed": args.seed,
        "files": str(procs.tempdir()),
    }
    engine = subprocess.run(
        [str(args.python), "-m", "kvstore.bench.sglang_bench", "--engine"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
    )
    if engine.returncode:
        raise RuntimeError(f"SGLang's side failed:\n{engine.stderr[-4000:]}")
    timings = json.loads(engine.stdout.splitlines()[-1])
    progress.update(task, advance=len(args.models), description="raw TCP")
    port = ceilings.start_server(procs, "tcp")
    rows = []
    for model, (page_bytes, runs) in timings.items():
        work = Workload(page_bytes, args.pages * page_bytes, args.pages)
        source = np.random.default_rng(args.seed).integers(0, 256, work.total, dtype=np.uint8)
        for scenario, direction in (("set", "put"), ("get", "get")):
            raw = [ceilings.raw_tcp(port, work, source, direction) for _ in range(args.repeat)]
            runs[f"{scenario}/raw_tcp"] = [r.seconds for r in raw]
        rows += _rows(model, page_bytes, args.pages, runs)
        progress.update(task, advance=1)
    _print_ratios(progress.console, rows)
    return rows


def _rows(model: str, page_bytes: int, pages: int, runs: dict[str, list[float]]) -> list[Row]:
    """One row per scenario and path, each kvstore row with its ratios to the ceilings of
    its path and to HiCacheFile."""
    rows = {}
    for name, seconds in runs.items():
        scenario, path = name.split("/")
        run = Run(pages * page_bytes * len(seconds), sum(seconds), seconds)
        extra = {"model": model, "pages": pages, "page_bytes": page_bytes}
        rows[scenario, path] = Row.of(scenario, path, page_bytes, run, **extra)
    for (scenario, path), row in rows.items():
        if path not in ("shm", "tcp") or not row.gbps:
            continue
        peers = ("memcpy", "hicache_file") + (("raw_tcp",) if path == "tcp" else ())
        for peer in peers:
            other = rows.get((scenario, peer))
            if other and other.gbps:
                row.ratios[peer] = round(row.gbps / other.gbps, 3)
    return list(rows.values())


def _print_ratios(console: Any, rows: list[Row]) -> None:
    for row in rows:
        if row.ratios:
            ratios = ", ".join(f"{v:g}x {k}" for k, v in row.ratios.items())
            console.print(
                f"sglang {row.extra['model']} ({format_size(row.block_size)} pages) "
                f"{row.scenario} {row.path}: {row.gbps:.2f} GB/s = {ratios}"
            )


# -- SGLang's side (in .venv-sglang) ------------------------------------------------------


def without_torchvision() -> None:
    """Let SGLang's memory pools import without torchvision. SGLang's model-config package
    imports it at load time (InternVL's and DeepSeek-OCR's image transforms); PyPI's build
    is CUDA's and does not load beside the CPU torch, and nothing on the storage path uses
    it. A module with the two names those imports take stands in, installed once
    transformers has found torchvision absent (it then keeps to its torch-only paths)."""
    import importlib.util

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision"):
        return
    import transformers  # noqa: F401  (first: it checks what is installed)

    vision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    modes = {"NEAREST": "nearest", "BILINEAR": "bilinear", "BICUBIC": "bicubic"}
    InterpolationMode = enum.Enum("InterpolationMode", modes)  # type: ignore[misc]
    functional.InterpolationMode = transforms.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    vision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.update(
        {m.__name__: m for m in (vision, transforms, functional)},
    )


def host_pool(
    layout: str, pages: int, page_size: int, layers: int, heads: int, head_dim: int, mla: bool
) -> Any:
    """A real SGLang host KV pool of `pages` pages on this CPU, built from a device pool the
    way SGLang's pool assembler builds it (`build_kv_host_pool`): MHA with `heads` x
    `head_dim` for K and V, or MLA with a latent of `heads` x `head_dim` + 64 rope dims."""
    import torch
    from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import _mha_host_inputs
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    common = {"size": page_size, "page_size": page_size, "dtype": torch.bfloat16}
    common |= {"layer_num": layers, "device": "cpu", "enable_memory_saver": False}
    host = {"pin_memory": False, "device": "cpu", "host_token_capacity": pages * page_size}
    if not mla:
        device = MHATokenToKVPool(head_num=heads, head_dim=head_dim, **common)
        cls, info, kwargs = _mha_host_inputs(device)
        return cls(info, 1.0, 0, page_size, layout, **host, **kwargs)
    device = MLATokenToKVPool(kv_lora_rank=heads * head_dim, qk_rope_head_dim=64, **common)
    return MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info,
        1.0,
        0,
        page_size,
        layout,
        override_kv_cache_dim=device.kv_cache_dim,
        device_capacity_tokens=device.size,
        start_layer=device.start_layer,
        end_layer=device.end_layer,
        target_layer_num=device.layer_num,
        **host,
    )


def storage_config(
    extra: dict[str, Any], *, tp_rank: int = 0, tp_size: int = 1, mla: bool = False
) -> Any:
    """A `HiCacheStorageConfig` as SGLang's cache controller makes it, SGLang's defaults for
    the rest (`tp_lcm_size` None, no pipeline or context parallelism)."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name=MODEL_NAME,
        extra_config=dict(extra),
    )


def attach(backend_name: str, config: Any, pool: Any) -> Any:
    """A backend made and given its pool as SGLang's `attach_storage_backend` does."""
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    backend = StorageBackendFactory.create_backend(backend_name, config, pool)
    backend.register_mem_pool_host(pool)
    return backend


def _engine() -> None:
    """Time each path on each model; print {model: [page bytes, {scenario/path: [s]}]}."""
    without_torchvision()
    spec = json.loads(sys.stdin.read())
    print(json.dumps({model: _time_model(spec, model) for model in spec["models"]}))


def _time_model(spec: dict[str, Any], model: str) -> tuple[int, dict[str, list[float]]]:
    """`repeat` rounds (after one that warms memory up) of every path setting the pool's
    pages under new keys and getting them back into the zeroed pool, checked whole."""
    import torch

    pages, page_size = spec["pages"], spec["page_size"]
    pool = host_pool(spec["layout"], pages, page_size, *MODELS[model], mla=False)
    data = pool.kv_buffer.view(torch.uint8)
    generator = torch.Generator().manual_seed(spec["seed"])
    data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=generator))
    reference = data.clone()
    paths = _paths(spec, pool, torch.arange(pages * page_size))
    runs: dict[str, list[float]] = {}
    for round_ in range(spec["repeat"] + 1):
        for path, mover in paths.items():
            keys = [
                sha256(f"{model}/{path}/{round_}/{i}".encode()).hexdigest() for i in range(pages)
            ]
            for scenario, call in (("set", mover.set), ("get", mover.get)):
                if scenario == "get":
                    data.zero_()
                start = time.perf_counter()
                call(keys)
                if round_:
                    runs.setdefault(f"{scenario}/{path}", []).append(time.perf_counter() - start)
            if not torch.equal(data, reference):
                raise AssertionError(f"{model}, {path}: the pages came back changed")
            mover.forget(keys)
    return pool.get_data_page(0).numel() * pool.dtype.itemsize, runs


def _paths(spec: dict[str, Any], pool: Any, indices: Any) -> dict[str, Any]:
    """What moves the pages, by path: kvstore's backend on each transport, HiCacheFile, and
    a copy of the same bytes."""
    from kvstore.client import Client

    node = Client(spec["address"])
    paths: dict[str, Any] = {}
    for path, transport in (("shm", "auto"), ("tcp", "tcp")):
        extra = {**BACKEND, "address": spec["address"], "transport": transport}
        paths[path] = KVStorePath(attach("dynamic", storage_config(extra), pool), indices, node)
    files = {"file_storage_path": tempfile.mkdtemp(dir=spec["files"])}
    paths["hicache_file"] = FilePath(attach("file", storage_config(files), pool), indices)
    paths["memcpy"] = CopyPath(pool.kv_buffer)
    return paths


def _all_moved(moved: list[bool] | bool | int, pages: int) -> None:
    if moved not in ([True] * pages, True, pages):
        raise RuntimeError(f"not every page moved: {moved}")


class KVStorePath:
    def __init__(self, backend: Any, indices: Any, node: Any) -> None:
        self.backend, self.indices, self.node = backend, indices, node

    def set(self, keys: list[str]) -> None:
        _all_moved(self.backend.batch_set_v1(keys, self.indices), len(keys))

    def get(self, keys: list[str]) -> None:
        _all_moved(self.backend.batch_get_v1(keys, self.indices), len(keys))

    def forget(self, keys: list[str]) -> None:
        self.node.delete(self.backend.node_keys(keys))


class FilePath:
    """HiCacheFile as SGLang's cache controller calls a backend without the v1 interface
    (`_generic_page_set`, `_generic_page_get`: a page at a time, through flat copies)."""

    def __init__(self, backend: Any, indices: Any) -> None:
        from sglang.srt.managers.cache_controller import HiCacheController

        self.controller = HiCacheController
        self.backend, self.indices = backend, indices
        pool = backend.mem_pool_host
        self.state = types.SimpleNamespace(
            storage_host_pool=pool, storage_backend=backend, page_size=pool.page_size
        )
        self.operation = types.SimpleNamespace(request_id="bench", is_terminated=lambda: False)

    def set(self, keys: list[str]) -> None:
        _all_moved(self.controller._generic_page_set(self.state, keys, self.indices), len(keys))

    def get(self, keys: list[str]) -> None:
        got = self.controller._generic_page_get(self.state, self.operation, keys, self.indices)
        _all_moved(got, len(keys))

    def forget(self, keys: list[str]) -> None:
        self.backend.clear()


class CopyPath:
    """The ceiling: the same bytes copied out of the pool's memory and back in."""

    def __init__(self, memory: Any) -> None:
        self.memory, self.copy = memory, memory.clone()

    def set(self, keys: list[str]) -> None:
        self.copy.copy_(self.memory)

    def get(self, keys: list[str]) -> None:
        self.memory.copy_(self.copy)

    def forget(self, keys: list[str]) -> None:
        pass


if __name__ == "__main__":
    if sys.argv[1:] == ["--engine"]:
        _engine()
    else:
        sys.exit("usage: python -m kvstore.bench.sglang_bench --engine  (see kvstore-bench sglang)")
