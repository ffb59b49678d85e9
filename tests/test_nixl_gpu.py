"""GPU memory over NIXL: Llama-3-8B-shaped KV put from one process's GPU memory and got
back into another's; damaged blocks and places outside registered memory refused. Needs a
CUDA device and NIXL (the device machine); skipped elsewhere, saying which is missing."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from kvstore import fabric
from kvstore.client import gpu_staging
from kvstore.errors import CorruptBlock, InvalidArgument
from kvstore.keys import block_keys
from kvstore.results import PutResult

torch = pytest.importorskip("torch", reason="no torch here, so no CUDA device")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device here", allow_module_level=True)
if why := fabric.why_not():
    pytest.skip(f"NIXL not importable: {why}", allow_module_level=True)

from conftest import Daemon, running_daemon  # noqa: E402  (after the skips: they say why)

# one block per 16-token page, every layer's K and V: 32 x 2 x 16 x 8 x 128 bf16 = 2 MiB
PAGE_SHAPE = (32, 2, 16, 8, 128)
LAYOUT = "layers,kv,tokens,heads,dim"
PAGES = 4096 // 16  # 4k tokens: 256 blocks, 512 MiB


def kv_pages(pages: int, seed: int) -> torch.Tensor:
    """`pages` pages of KV in GPU memory, the same for the same seed in any process."""
    generator = torch.Generator("cuda").manual_seed(seed)
    shape = (pages, *PAGE_SHAPE)
    return torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)


def poisoned(pages: int) -> torch.Tensor:
    return torch.full((pages, *PAGE_SHAPE), -7.0, device="cuda", dtype=torch.bfloat16)


def byte_views(pages: torch.Tensor) -> list[torch.Tensor]:
    return [page.view(torch.uint8).reshape(-1) for page in pages]


def get_into_gpu(client, keys, dest: torch.Tensor) -> int:
    """`client.get_into` with each block placed in page i of `dest`."""
    landed: list[int] = []
    count = client.get_into(keys, lambda blocks: byte_views(dest[: len(blocks)]), landed.append)
    assert landed == list(range(count))
    return count


def consume(address: str, keys: list, seed: int) -> tuple[int, bool, str, tuple]:
    """Another process: the pages got into its own registered GPU memory, whether they are
    byte-identical to what was put, and the first block's dtype and shape as a host get
    sees them."""
    from kvstore.client import Client

    with Client(address, transport="nixl") as client:
        dest = poisoned(len(keys))
        client.register(dest)
        count = get_into_gpu(client, keys, dest)
        same = torch.equal(dest.view(torch.int16), kv_pages(len(keys), seed).view(torch.int16))
        first = client.get(keys[:1])[0]
    return count, same, first.dtype.name, first.shape


@pytest.fixture(scope="module")
def node() -> Iterator[Daemon]:
    with running_daemon("--host-capacity", "1GiB", "--nixl", "on", "--prefault", "false") as d:
        yield d


@pytest.fixture
def client(node: Daemon):
    with node.client(transport="nixl") as client:
        yield client


def test_kv_from_gpu_memory_lands_byte_identical_in_another_process(node, client, salt) -> None:
    keys = block_keys(np.arange(PAGES * 16), 16, salt)
    kv = kv_pages(PAGES, seed=1)
    client.register(kv)
    assert client.put_from(keys, list(kv), layout=LAYOUT) == PutResult(PAGES, 0)
    assert client.put_from(keys, list(kv), layout=LAYOUT) == PutResult(0, PAGES)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as other:
        count, same, dtype, shape = other.submit(consume, node.address, keys, 1).result()
    assert (count, same) == (PAGES, True)
    assert (dtype, shape) == ("bfloat16", PAGE_SHAPE)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "direct"])
def test_a_damaged_block_is_never_written_into_gpu_memory(
    node, client, salt, staged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks put from GPU memory carry checksums, and every block of a get bound for GPU
    memory is checked before any is written there: by the client in its staging, or (UCX
    moving GPU memory itself) by the node before any leaves."""
    monkeypatch.setattr(gpu_staging, "STAGED", staged)
    keys = block_keys(np.arange(2 * 16), 16, salt)
    kv = kv_pages(2, seed=2)
    client.register(kv)
    client.put_from(keys, list(kv))
    with node.client(transport="shm") as shm, shm.lease(keys[1:]) as lease:
        at = lease.blocks[0].ctypes.data - shm.shared_arena().ctypes.data
        shm.shared_arena()[at + 1000] ^= 0xFF  # as any process of the node's user can
    dest = poisoned(2)
    client.register(dest)
    with pytest.raises(CorruptBlock, match=f"block {keys[1].hex()}"):
        get_into_gpu(client, keys, dest)
    assert torch.equal(dest, poisoned(2))  # neither block was written
    assert get_into_gpu(client, keys[:1], dest) == 1
    assert torch.equal(dest[0], kv[0])


def test_places_and_sources_outside_registered_gpu_memory_are_refused(node, client, salt) -> None:
    keys = block_keys(np.arange(16), 16, salt)
    kv, stray = kv_pages(1, seed=3), kv_pages(1, seed=4)
    client.register(kv)
    with pytest.raises(InvalidArgument, match="sources"):
        client.put_from(keys, list(stray))
    assert client.put_from(keys, list(kv)) == PutResult(1, 0)
    with pytest.raises(InvalidArgument, match="place"):
        get_into_gpu(client, keys, stray)
    assert torch.equal(stray, kv_pages(1, seed=4))
    dest = poisoned(1)
    client.register(dest)
    assert get_into_gpu(client, keys, dest) == 1 and torch.equal(dest, kv)
