"""GPU memory -> node -> GPU memory over NIXL: Llama-3-8B-shaped KV (32 layers, 8 KV heads
x 128, bf16, 16-token pages: one 2 MiB block a page) put from one process's GPU memory into
a node, then got back into another process's GPU memory, each direction beside a pinned
cudaMemcpy of the same bytes in the same process (device to host for a put, host to device
for a get).

    kvstore-bench nixl-gpu [--tokens 4096,32768] [--modes staged,direct,pinned] [--json FILE]

`staged`: `put_from` and `get_into` with the CUDA tensors, as an engine calls them (the
client stages them in its registered host memory: client/gpu_staging.py). `direct`: the
same with staging off, UCX moving the GPU memory itself. `pinned`: the engine stages in
two registered pinned buffers itself, copies on a CUDA stream overlapping the NIXL
transfer of the part before. Every block bound for GPU memory is checked against its
checksum (by the client, or by the node when direct), inside the timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from kvstore.bench.measure import Run
from kvstore.bench.procs import Processes
from kvstore.bench.report import Row

HELP = "KV from GPU memory to a node and back into another process's GPU memory, over NIXL"
PAGE_SHAPE = (32, 2, 16, 8, 128)  # layers, K and V, tokens, KV heads, head dim (bf16)
PAGE_TOKENS = PAGE_SHAPE[2]
PAGE = int(np.prod(PAGE_SHAPE)) * 2  # 2 MiB
LAYOUT = "layers,kv,tokens,heads,dim"
STAGED_PART = 64  # pages a staged part holds: 128 MiB


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--tokens", type=ints, default=[4096, 32768], help="tokens of KV moved")
    modes = ("staged", "direct", "pinned")
    parser.add_argument("--modes", type=choices(modes), default=list(modes))


def check(args: argparse.Namespace) -> str:
    from kvstore import fabric

    if args.address:
        return "nixl-gpu starts a node of its own (sized to the KV): --address is not for it"
    if any(t < PAGE_TOKENS or t % PAGE_TOKENS for t in args.tokens):
        return f"--tokens must be multiples of {PAGE_TOKENS}"
    return fabric.why_not()


def run(
    args: argparse.Namespace, procs: Processes, address: str, progress: Any, task: Any
) -> list[Row]:
    """One node of its own, with room for the largest KV; one process puts, another gets."""
    capacity = max(args.tokens) // PAGE_TOKENS * PAGE + (1 << 30)
    node = procs.daemon("--host-capacity", str(capacity), "--nixl", "on")
    progress.update(task, total=2 * len(args.tokens) * len(args.modes))
    rows = []
    for tokens in args.tokens:
        for mode in args.modes:
            for direction in ("put", "get"):
                progress.update(task, description=f"{direction} {tokens} tokens, {mode}")
                child = [sys.executable, "-m", "kvstore.bench.nixl_gpu", direction, node]
                child += [str(tokens), mode, str(args.repeat), str(args.seed)]
                proc = procs.spawn(child, stdout=subprocess.PIPE, text=True)
                out, _ = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"{' '.join(child)} failed ({proc.returncode})")
                rows += _rows(direction, mode, tokens, json.loads(out.splitlines()[-1]))
                progress.update(task, advance=1)
    return rows


def _rows(direction: str, mode: str, tokens: int, figures: dict[str, Any]) -> list[Row]:
    nbytes = tokens // PAGE_TOKENS * PAGE
    scenario = f"{direction} {tokens // 1024}k tok"

    def row(path: str, seconds: list[float], **extra: Any) -> Row:
        return Row.of(
            scenario, path, PAGE, Run(nbytes, float(np.median(seconds)), seconds), **extra
        )

    ceiling = row("memcpy", figures["memcpy"], tokens=tokens, copy="pinned cudaMemcpy")
    moved = row(f"nixl-{mode}", figures["seconds"], tokens=tokens, identical=figures["same"])
    moved.ratios["memcpy"] = round(moved.gbps / ceiling.gbps, 3)  # type: ignore[operator]
    return [ceiling, moved]


# -- the two processes ---------------------------------------------------------------------


def _kv(pages: int, seed: int) -> Any:
    """`pages` pages of KV in GPU memory, the same for the same seed in any process."""
    import torch

    generator = torch.Generator("cuda").manual_seed(seed)
    shape = (pages, *PAGE_SHAPE)
    return torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)


def timed(fn: Callable[[], object], repeat: int, setup: Callable[[], object]) -> list[float]:
    """Seconds of each of `repeat` runs after one warm-up, the GPU drained before and
    after each; `setup` runs before each, untimed."""
    import torch

    times = []
    for i in range(repeat + 1):
        setup()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return times


def pinned_memcpy(kv: Any, direction: str, repeat: int) -> list[float]:
    """The ceiling: one pinned copy of all of `kv`, down for a put, up for a get."""
    import torch

    flat = kv.view(torch.uint8).reshape(-1)
    host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
    if direction == "put":
        return timed(lambda: host.copy_(flat, non_blocking=True), repeat, lambda: None)
    return timed(lambda: flat.copy_(host, non_blocking=True), repeat, lambda: None)


class Staging:
    """Two registered pinned host buffers of `STAGED_PART` pages: one moves through NIXL
    while a CUDA stream copies the next part into, or the last one out of, the other."""

    def __init__(self, client: Any) -> None:
        import torch

        self.stream = torch.cuda.Stream()
        shape = (STAGED_PART, *PAGE_SHAPE)
        self.buffers = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for _ in "ab"]
        for buffer in self.buffers:
            client.register(buffer)

    def copy(self, into: Any, source: Any) -> Any:
        """An event that fires once `source` is copied into `into` on the stream."""
        import torch

        with torch.cuda.stream(self.stream):
            into.copy_(source, non_blocking=True)
            return self.stream.record_event()

    def put(self, client: Any, keys: Sequence[Any], kv: Any) -> None:
        parts = range(0, len(keys), STAGED_PART)
        copied = self.copy(self.buffers[0][: len(kv[:STAGED_PART])], kv[:STAGED_PART])
        for n, first in enumerate(parts):
            pages = len(kv[first : first + STAGED_PART])
            buffer = self.buffers[n % 2][:pages]
            copied.synchronize()
            nxt = first + STAGED_PART
            if nxt < len(keys):  # the next part down while this one goes to the node
                following = kv[nxt : nxt + STAGED_PART]
                copied = self.copy(self.buffers[(n + 1) % 2][: len(following)], following)
            client.put_from(keys[first : first + pages], list(buffer), layout=LAYOUT)

    def get(self, client: Any, keys: Sequence[Any], dest: Any) -> None:
        """Each part into a buffer and checked there, then up to `dest` on the stream
        while the next part comes into the other buffer."""
        import xxhash

        copied: list[Any] = [None, None]
        for n, first in enumerate(range(0, len(keys), STAGED_PART)):
            buffer, metas = self.buffers[n % 2], list[Any]()
            if copied[n % 2] is not None:
                copied[n % 2].synchronize()  # the part before last is up on the GPU
            part = keys[first : first + STAGED_PART]
            landed = client.get_into(part, partial(_places, buffer, metas), _ignore)
            for page, meta in zip(buffer[:landed], metas, strict=False):
                if xxhash.xxh3_64_intdigest(_host_bytes(page)) != meta.checksum:
                    raise RuntimeError("a block failed its checksum")
            copied[n % 2] = self.copy(dest[first : first + landed], buffer[:landed])
        for event in copied:
            if event is not None:
                event.synchronize()


def _ignore(_: int) -> None:
    pass


def _places(buffer: Any, metas: list, blocks: list) -> list:
    """Page i of `buffer` for block i, as bytes; the blocks' metadata kept in `metas`."""
    import torch

    metas.extend(meta for _, meta in blocks)
    return [page.view(torch.uint8).reshape(-1) for page in buffer[: len(blocks)]]


def _host_bytes(page: Any) -> memoryview:
    import ctypes

    return memoryview((ctypes.c_ubyte * (page.numel() * 2)).from_address(page.data_ptr()))


def child(direction: str, address: str, tokens: int, mode: str, repeat: int, seed: int) -> dict:
    """One process's side: its pinned-copy ceiling, and its timed puts or gets."""
    import torch

    from kvstore.client import Client, gpu_staging
    from kvstore.keys import block_keys

    pages = tokens // PAGE_TOKENS
    keys = block_keys(np.arange(tokens), PAGE_TOKENS, b"nixl-gpu %d" % seed)
    with Client(address, transport="nixl") as client:
        gpu_staging.STAGED = mode != "direct"
        staging = Staging(client) if mode == "pinned" else None
        if direction == "put":
            kv = _kv(pages, seed)
            put: Callable[[], object]
            if staging is None:
                client.register(kv)
                put = partial(client.put_from, keys, list(kv), layout=LAYOUT)
            else:
                put = partial(staging.put, client, keys, kv)
            ceiling = pinned_memcpy(kv, direction, repeat)
            seconds = timed(put, repeat, lambda: client.delete(keys))
            same = client.lookup(keys) == pages
        else:
            dest = torch.empty((pages, *PAGE_SHAPE), dtype=torch.bfloat16, device="cuda")
            ceiling = pinned_memcpy(dest, direction, repeat)
            get: Callable[[], object]
            if staging is None:
                client.register(dest)
                get = partial(client.get_into, keys, partial(_places, dest, []), _ignore)
            else:
                get = partial(staging.get, client, keys, dest)
            seconds = timed(get, repeat, lambda: dest.fill_(-7.0))
            same = torch.equal(dest.view(torch.int16), _kv(pages, seed).view(torch.int16))
    return {"memcpy": ceiling, "seconds": seconds, "same": bool(same)}


def main() -> None:
    direction, address, tokens, mode, repeat, seed = sys.argv[1:7]
    print(json.dumps(child(direction, address, int(tokens), mode, int(repeat), int(seed))))


if __name__ == "__main__":
    main()
