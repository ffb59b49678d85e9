"""The vLLM connector's page movement on a GPU (kvstore.integrations.vllm.gpu_pages), with
layer tensors laid out as vLLM 0.32's GPU model runner lays them: one allocation in the
layout's physical order of [L, B, H, N, C], each layer a view of it with the logical shape
[B, H, N, C]. vLLM's GPU build cannot be installed where the GPU is, so this drives the
modules that move pages (torch only) the way the connector's worker side does: a save from
one process (the in-place path into the node's arena, or pinned staging over TCP), a load into
another process's cache, byte for byte; caches of another layout or dtype never loaded; and a
node killed mid-load leaving the layers it did not bring untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import running_daemon
from kvstore.client.layers import LayeredKV

torch = pytest.importorskip("torch", reason="the GPU tests need torch")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: run on the GPU machine"
)

LAYERS, BLOCKS, TOKENS = 4, 64, 16
# backend, layout, heads, content (K then V in C; MLA: one latent per token), dtype
CASES = [
    ("FLASH_ATTN", "LBNHC", 8, 256, "bfloat16"),
    ("FLASHINFER", "LBNHC", 8, 256, "float16"),
    ("FLASHINFER", "LBHNC", 8, 256, "bfloat16"),
    ("FLASH_ATTN", "BLNHC", 8, 256, "fp8"),
    ("FLASHMLA", "LBNHC", 1, 576, "bfloat16"),
    ("FLASH_ATTN", "LHBNC", 8, 256, "bfloat16"),  # a page is one run per head
]
SAVED = [5, 9, 2, 40, 41, 42, 63]  # the producer's block ids
LOADED = [0, 1, 2, 3, 10, 11, 12]  # where the consumer's cache takes them


def pages_of(case: tuple, seed: int | None):
    from kvstore.bench.vllm_gpu import vllm_pages

    backend, layout, heads, content, dtype = case
    sizes = {"L": LAYERS, "B": BLOCKS, "H": heads, "N": TOKENS, "C": content}
    return vllm_pages(backend, layout, sizes, dtype, seed)


def page_bytes(pages, block_ids: list[int]) -> list[bytes]:
    """Every layer's pages of `block_ids`, as bytes, for comparing caches."""
    return [
        b"".join(bytes(r.cpu().numpy()) for r in regions)
        for layer in pages.layers
        for regions in pages._layers[layer].regions(block_ids)
    ]


def keys_for(name: str) -> list[bytes]:
    from kvstore.keys import block_keys

    return block_keys(np.arange(len(SAVED) * TOKENS), TOKENS, name.encode())


def save(address: str, case: tuple, transport: str, name: str) -> None:
    """In a process of its own: the producer's cache saved layer by layer, as the saver does
    (in place into the node's arena when it shares the host, else through pinned staging)."""
    from kvstore.client import Client

    pages = pages_of(case, seed=1)
    with Client(address, transport=transport) as client:
        layered = LayeredKV(client, pages.layers)
        in_place = pages.attach(client)
        for layer in pages.layers:
            pages.computed(layer)
            if in_place:
                fill = pages.fill(layer, SAVED)
                layered.put_in_place(keys_for(name), layer, pages.dtype, pages.shape, fill)
            else:
                layered.put(keys_for(name), layer, pages.views(layer, SAVED))
    print(json.dumps({"in_place": in_place}))


def produce(address: str, case: tuple, transport: str, name: str) -> bool:
    args = json.dumps([address, list(case), transport, name])
    out = subprocess.run(
        [sys.executable, __file__, args], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])["in_place"]


def load(
    address: str, pages, transport: str, name: str, lease: bool, arrived=None, ahead: int = 2
) -> list:
    from kvstore.client import Client

    with Client(address, transport=transport) as client:
        if lease:
            assert pages.attach(client)

        def written(layer: int, arrays: list[np.ndarray]) -> None:
            assert pages.write(layer, LOADED, arrays) == len(SAVED)
            if arrived:
                arrived(layer)

        layered = LayeredKV(client, pages.layers)
        gets = layered.get(keys_for(name), lease=lease, arrived=written, ahead=ahead)
        with gets:
            return [gets.wait(layer, timeout=60) for layer in pages.layers]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_pages_saved_by_one_process_load_into_another_byte_for_byte(case, transport) -> None:
    name = f"gpu {case} {transport}"
    with running_daemon("--host-capacity", "1GiB") as daemon:
        if transport == "shm":  # held already: the in-place save skips its slot
            held = pages_of(case, seed=1)
            with daemon.client(transport="tcp") as client:
                layered = LayeredKV(client, held.layers)
                for layer in held.layers:
                    layered.put(keys_for(name)[2:3], layer, held.views(layer, SAVED[2:3]))
        assert produce(daemon.address, case, transport, name) == (transport == "shm")
        consumer = pages_of(case, seed=None)
        load(daemon.address, consumer, transport, name, lease=transport == "shm")
    assert page_bytes(consumer, LOADED) == page_bytes(pages_of(case, seed=1), SAVED)
    untouched = [b for b in range(BLOCKS) if b not in LOADED][:3]
    assert set(page_bytes(consumer, untouched)) == {bytes(consumer.nbytes)}


def test_pages_of_another_layout_or_dtype_are_never_loaded() -> None:
    """Pages saved from a cache with 8 heads do not fit one with 4: nothing is written. A
    cache described with another dtype than its tensors' is refused at start."""
    from kvstore.client import Client
    from kvstore.errors import Unsupported
    from kvstore.integrations.vllm.gpu_pages import GpuPages
    from kvstore.integrations.vllm.layouts import CacheLayout

    other = ("FLASH_ATTN", "LBNHC", 4, 256, "bfloat16")
    with running_daemon("--host-capacity", "1GiB") as daemon:
        produce(daemon.address, CASES[0], "tcp", "layout")
        consumer = pages_of(other, seed=None)
        with (
            Client(daemon.address, transport="tcp") as client,
            LayeredKV(client, consumer.layers).get(keys_for("layout")) as gets,
        ):
            arrays = gets.wait(0, timeout=60)
        assert len(arrays) == len(SAVED) and consumer.write(0, LOADED, arrays) == 0
    assert set(page_bytes(consumer, LOADED)) == {bytes(consumer.nbytes)}
    layer = torch.zeros(BLOCKS, 8, TOKENS, 256, dtype=torch.bfloat16, device="cuda")
    kv = {"model.layers.0.self_attn.attn": layer}  # LBHNC, one layer
    described = CacheLayout("FLASH_ATTN", "LBHNC", TOKENS, "fp8")
    with pytest.raises(Unsupported, match="fp8"):
        GpuPages(kv, lambda name: int(name.split(".")[2]), described)


def test_a_node_killed_mid_load_leaves_the_layers_it_did_not_bring_untouched() -> None:
    from kvstore.errors import KVStoreError

    case = CASES[0]
    with running_daemon("--host-capacity", "1GiB") as daemon:
        produce(daemon.address, case, "tcp", "killed")
        consumer = pages_of(case, seed=None)

        def kill_after_first(layer: int) -> None:
            if layer == 0:
                daemon.process.send_signal(signal.SIGKILL)
                daemon.process.wait()

        with pytest.raises((KVStoreError, OSError)):  # one layer at a time: 1 never starts
            load(daemon.address, consumer, "tcp", "killed", False, kill_after_first, ahead=1)
    expected = page_bytes(pages_of(case, seed=1), SAVED)
    got = page_bytes(consumer, LOADED)
    assert got[: len(SAVED)] == expected[: len(SAVED)]  # layer 0: whole
    assert set(got[len(SAVED) :]) == {bytes(consumer.nbytes)}  # the others: untouched


if __name__ == "__main__":
    address, case, transport, name = json.loads(sys.argv[1])
    save(address, tuple(case), transport, name)
