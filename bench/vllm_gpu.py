"""The vLLM connector's page movement on a GPU: Llama-3-8B-shaped KV (32 layers, 8 KV heads x
128, bf16, 16-token pages; FlashAttention's layout, K and V in each page) saved from a vLLM-laid
cache into a node on the same host, layer by layer as the connector's saver does, and loaded
back into another cache layer by layer as its loads do, beside a pinned cudaMemcpy of the same
bytes in the same run. Both moves go straight between GPU memory and the node's arena,
page-locked here (`kvstore.integrations.vllm.gpu_pages`).

    kvstore-bench vllm-gpu [--tokens 4096,32768] [--json FILE]

`layer0_ms`: when a load's first layer was in place, against `p50_ms` for all of it: how long
attention on layer 0 would wait.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from kvstore.bench.measure import Run
from kvstore.bench.nixl_gpu import pinned_memcpy, timed
from kvstore.bench.procs import Processes
from kvstore.bench.report import Row

HELP = "vLLM GPU KV pages to a node and back, per layer, against pinned cudaMemcpy"
LAYERS, HEADS, HEAD_DIM = 32, 8, 128
LAYOUT = "LBNHC"  # FlashAttention's default: tokens, then heads, then K and V in C


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--tokens", type=ints, default=[4096, 32768], help="tokens of KV moved")
    parser.add_argument(
        "--page-tokens",
        type=ints,
        default=[16, 256],
        help="vLLM's --block-size: tokens a page (and a kvstore block) holds",
    )


def check(args: argparse.Namespace) -> str:
    try:
        import torch
    except ImportError:
        return "vllm-gpu needs torch with CUDA"
    if not torch.cuda.is_available():
        return "vllm-gpu needs a CUDA device"
    if args.address:
        return "vllm-gpu starts a node of its own (sized to the KV): --address is not for it"
    if any(t < p or t % p for t in args.tokens for p in args.page_tokens):
        return "--tokens must be multiples of every --page-tokens"
    return ""


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    from kvstore.client import Client

    capacity = max(args.tokens) * LAYERS * HEADS * 2 * HEAD_DIM * 2 * 2 + (1 << 30)
    node = procs.daemon("--host-capacity", str(capacity))
    progress.update(task, total=len(args.tokens) * len(args.page_tokens))
    rows = []
    with Client(node) as client:
        for tokens in args.tokens:
            for page_tokens in args.page_tokens:
                rows += _measure(client, tokens, page_tokens, args.repeat, args.seed)
                progress.update(task, advance=1, description=f"{tokens} tokens")
    return rows


def _measure(client: Any, tokens: int, page_tokens: int, repeat: int, seed: int) -> list[Row]:
    import torch

    from kvstore.client.layers import LayeredKV
    from kvstore.keys import block_keys

    blocks = tokens // page_tokens
    sizes = {"L": LAYERS, "B": blocks, "H": HEADS, "N": page_tokens, "C": 2 * HEAD_DIM}
    source = vllm_pages("FLASH_ATTN", LAYOUT, sizes, "bfloat16", seed)
    dest = vllm_pages("FLASH_ATTN", LAYOUT, sizes, "bfloat16", None)
    assert source.attach(client) and dest.attach(client), "the node shares this host"
    ids = list(range(blocks))[::-1]  # vLLM hands out blocks in no particular order
    layered = LayeredKV(client, source.layers)
    keys = block_keys(np.arange(tokens), page_tokens, f"kvstore-bench/vllm-gpu/{seed}".encode())

    def save() -> None:
        for layer in source.layers:
            source.computed(layer)
            fill = source.fill(layer, ids)
            layered.put_in_place(keys, layer, source.dtype, source.shape, fill)

    first: list[float] = []

    def load() -> None:
        start = time.perf_counter()
        written = lambda layer, arrays: dest.write(layer, ids, arrays)  # noqa: E731
        with layered.get(keys, lease=True, arrived=written) as gets:
            gets.wait(source.layers[0], timeout=120)
            first.append(time.perf_counter() - start)
            for layer in source.layers[1:]:
                gets.wait(layer, timeout=120)

    saves = timed(save, repeat, lambda: layered.delete(keys))
    loads = timed(load, repeat, lambda: None)
    same = all(
        torch.equal(source._layers[layer].gather(ids), dest._layers[layer].gather(ids))
        for layer in source.layers
    )
    layered.delete(keys)
    nbytes = blocks * LAYERS * source.nbytes
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    down, up = pinned_memcpy(flat, "put", repeat), pinned_memcpy(flat, "get", repeat)
    rows = []
    for scenario, seconds, ceiling in (("save", saves, down), ("load", loads, up)):
        name = f"{scenario} {tokens // 1024}k tok, {page_tokens}-tok pages"
        memcpy = Row.of(name, "memcpy", source.nbytes, _run(nbytes, ceiling), copy="pinned")
        moved = Row.of(name, "vllm-gpu", source.nbytes, _run(nbytes, seconds), identical=same)
        moved.ratios["memcpy"] = round(moved.gbps / memcpy.gbps, 3)  # type: ignore[operator]
        if scenario == "load":
            moved.extra["layer0_ms"] = round(float(np.median(first[1:])) * 1e3, 3)
            moved.extra["layer0_share"] = round(float(np.median(first[1:])) / np.median(seconds), 3)
        rows += [memcpy, moved]
    return rows


def _run(nbytes: int, seconds: list[float]) -> Run:
    return Run(nbytes, float(np.median(seconds)), seconds)


def vllm_pages(
    backend: str, layout: str, sizes: dict[str, int], dtype: str, seed: int | None
) -> Any:
    """`GpuPages` over a cache laid out as vLLM's GPU model runner lays it: one allocation in
    `layout`'s physical order of `sizes` (L, B, H, N, C), a [B, H, N, C] view a layer; seeded
    random bytes, or zeros. `dtype`: a torch dtype's name, or "fp8" (one byte an element)."""
    import torch

    from kvstore.integrations.vllm.gpu_pages import GpuPages
    from kvstore.integrations.vllm.layouts import CacheLayout

    element = torch.uint8 if dtype == "fp8" else getattr(torch, dtype)
    raw = torch.zeros([sizes[d] for d in layout], dtype=element, device="cuda")
    if seed is not None:
        generator = torch.Generator("cuda").manual_seed(seed)
        flat = raw.view(torch.uint8)
        flat.copy_(torch.randint(0, 256, flat.shape, generator=generator, device="cuda",
                                 dtype=torch.uint8))  # fmt: skip
    logical = raw.permute(*[layout.index(d) for d in "LBHNC"])
    kv = {f"model.layers.{i}.self_attn.attn": logical[i] for i in range(sizes["L"])}
    described = CacheLayout(backend, layout, sizes["N"], "fp8" if dtype == "fp8" else "auto")
    return GpuPages(kv, lambda name: int(name.split(".")[2]), described)
