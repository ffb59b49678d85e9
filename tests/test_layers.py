"""Per-layer transfers (kvstore.client.layers): a prompt's blocks stored layer by layer, a
block counted only when every layer of it is stored, and loads that hand back each layer as
soon as it has arrived, against a real daemon."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from kvstore.client.layers import LayeredKV, layer_key, layer_keys
from kvstore.errors import Unavailable
from kvstore.keys import block_keys

LAYERS = 4
PAGE = (2, 16, 8)  # one layer of one block: heads, tokens, channels


def pages(rng: np.random.Generator, blocks: int) -> np.ndarray:
    """[layers, blocks, *PAGE] float32, as an engine's paged cache holds them."""
    return rng.standard_normal((LAYERS, blocks, *PAGE)).astype(np.float32)


def store(layered: LayeredKV, keys: list[bytes], kv: np.ndarray, **put: object) -> None:
    for layer in range(LAYERS):
        layered.put(keys, layer, list(kv[layer]), **put)


@pytest.fixture(params=["shm", "tcp", "grpc"])
def layered(daemon, request):
    with daemon.client(transport=request.param) as client:
        yield LayeredKV(client, LAYERS)


def test_layers_put_apart_come_back_layer_by_layer(layered, salt, rng) -> None:
    keys = block_keys(np.arange(5 * 16), 16, salt)
    kv = pages(rng, 5)
    store(layered, keys, kv)
    assert layered.lookup(keys) == 5
    with layered.get(keys) as gets:
        for layer in range(LAYERS):
            got = gets.wait(layer, timeout=30)
            assert len(got) == 5
            assert all((g == kv[layer, b]).all() for b, g in enumerate(got))


def test_a_block_counts_only_once_every_layer_is_stored(layered, salt, rng) -> None:
    keys = block_keys(np.arange(6 * 16), 16, salt)
    kv = pages(rng, 6)
    for layer in range(LAYERS - 1):  # the last layer is not stored yet
        layered.put(keys, layer, list(kv[layer]))
    assert layered.lookup(keys) == 0
    layered.put(keys[:4], LAYERS - 1, list(kv[LAYERS - 1, :4]))
    assert layered.lookup(keys) == 4
    assert layered.client.delete([layer_key(keys[1], 2)]) == 1  # one page of block 1 goes
    assert layered.lookup(keys) == 1
    with layered.get(keys) as gets:
        assert len(gets.wait(2, timeout=30)) == 1  # a prefix: the layer stops at block 1
        assert len(gets.wait(0, timeout=30)) == 6


def test_every_chain_must_hold_a_block(layered, salt, rng) -> None:
    """One chain per tensor-parallel rank: a block counts when every rank stored its part."""
    tokens = np.arange(3 * 16)
    rank0, rank1 = block_keys(tokens, 16, salt + b"/0"), block_keys(tokens, 16, salt + b"/1")
    store(layered, rank0, pages(rng, 3))
    store(layered, rank1[:2], pages(rng, 2))
    assert layered.lookup(rank0) == 3
    assert layered.lookup(rank0, rank1) == 2
    assert layered.lookup_tiers(rank0, rank1) == ["host", "host"]


def test_layer_zero_is_handed_back_before_layer_one_has_arrived(daemon, salt, rng) -> None:
    keys = block_keys(np.arange(2 * 16), 16, salt)
    kv = pages(rng, 2)
    release = threading.Event()

    def arrived(layer: int, arrays: list[np.ndarray]) -> None:
        if layer == 1:
            release.wait(30)  # layer 1 is held in its fetching thread

    with daemon.client(transport="tcp") as client:
        layered = LayeredKV(client, LAYERS)
        store(layered, keys, kv)
        with layered.get(keys, arrived=arrived, ahead=1) as gets:
            assert (gets.wait(0, timeout=30)[1] == kv[0, 1]).all()
            assert not gets.done(1)
            with pytest.raises(Unavailable, match="layer 1 did not arrive"):
                gets.wait(1, timeout=0.05)
            release.set()
            assert (gets.wait(3, timeout=30)[0] == kv[3, 0]).all()


def test_nothing_is_written_once_a_load_is_closed(daemon, salt, rng) -> None:
    keys = block_keys(np.arange(2 * 16), 16, salt)
    store_to = np.zeros((LAYERS, 2, *PAGE), np.float32)
    seen: list[int] = []
    first = threading.Event()
    go_on = threading.Event()

    def arrived(layer: int, arrays: list[np.ndarray]) -> None:
        seen.append(layer)
        if layer == 0:
            first.set()
            go_on.wait(30)
        for b, array in enumerate(arrays):
            store_to[layer, b] = array

    pool = ThreadPoolExecutor(1)
    with daemon.client(transport="tcp") as client:
        layered = LayeredKV(client, LAYERS)
        store(layered, keys, pages(rng, 2))
        gets = layered.get(keys, arrived=arrived, executor=pool)
        assert first.wait(30)
        closer = threading.Thread(target=gets.close)
        closer.start()  # it waits for the copy of layer 0 to finish
        go_on.set()
        closer.join(30)
        assert not closer.is_alive()
        seen_at_close, written = list(seen), store_to.copy()
        pool.shutdown(wait=True)  # every fetch the load had queued has run, or never will
        with pytest.raises(CancelledError):  # not fetched before the close
            gets.wait(LAYERS - 1, timeout=30)
    assert seen == seen_at_close and seen[0] == 0 and LAYERS - 1 not in seen
    assert (store_to == written).all()


def test_leased_layers_are_views_of_the_arena_until_closed(daemon, salt, rng) -> None:
    keys = block_keys(np.arange(3 * 16), 16, salt)
    kv = pages(rng, 3)
    with daemon.client(transport="shm") as client:
        layered = LayeredKV(client, LAYERS)
        store(layered, keys, kv)
        before = client.stats().transfers.get("get/shm", 0)
        with layered.get(keys, lease=True) as gets:
            views = [gets.wait(layer, timeout=30) for layer in range(LAYERS)]
            assert np.shares_memory(views[2][1], client.shared_arena())
            assert all(
                (views[layer][b] == kv[layer, b]).all() for layer in range(4) for b in range(3)
            )
        leases = client.stats().transfers.get("get/shm", 0) - before
        assert leases == 3  # layers [0], [1], [2, 3]: one request each
        client.delete([layer_key(keys[1], 2)])
        with layered.get(keys, lease=True) as gets:  # layers 2 and 3 went in one request
            assert [len(gets.wait(layer, timeout=30)) for layer in range(LAYERS)] == [3, 3, 1, 1]


def test_buffers_are_asked_for_as_each_layer_starts(daemon, salt, rng) -> None:
    keys = block_keys(np.arange(3 * 16), 16, salt)
    kv = pages(rng, 3)
    ring = [np.empty(3 * kv[0, 0].nbytes, np.uint8) for _ in range(2)]
    asked: list[int] = []

    def out(layer: int) -> np.ndarray:
        asked.append(layer)
        return ring[layer % 2]

    copies = np.zeros_like(kv)

    def arrived(layer: int, arrays: list[np.ndarray]) -> None:
        assert np.shares_memory(arrays[0], ring[layer % 2])  # received straight into it
        copies[layer] = np.stack(arrays)

    with daemon.client(transport="tcp") as client:
        layered = LayeredKV(client, LAYERS)
        store(layered, keys, kv)
        with layered.get(keys, out=out, arrived=arrived, ahead=1) as gets:
            gets.wait(LAYERS - 1, timeout=30)
    assert asked == list(range(LAYERS))
    assert (copies == kv).all()


def test_layers_put_in_place_and_with_a_codec(daemon, salt, rng) -> None:
    keys = block_keys(np.arange(4 * 16), 16, salt)
    kv = pages(rng, 4)
    with daemon.client(transport="shm") as client:
        layered = LayeredKV(client, LAYERS)

        def fill_from(layer: int):
            def fill(indexes: list[int], slots: list[np.ndarray]) -> None:
                for i, slot in zip(indexes, slots, strict=True):
                    slot.view(np.float32).reshape(PAGE)[:] = kv[layer, i]

            return fill

        for layer in range(2):
            layered.put_in_place(keys, layer, np.float32, PAGE, fill_from(layer))
        for layer in range(2, LAYERS):
            layered.put(keys, layer, list(kv[layer]), codec="shuffle-zstd")
        assert layered.lookup(keys) == 4
    with daemon.client(transport="tcp") as client, LayeredKV(client, LAYERS).get(keys) as gets:
        for layer in range(LAYERS):
            got = gets.wait(layer, timeout=30)
            assert all(
                g.dtype == np.float32 and (g == kv[layer, b]).all() for b, g in enumerate(got)
            )


def test_layer_keys_are_their_own(salt) -> None:
    keys = block_keys(np.arange(2 * 16), 16, salt)
    derived = {k for layer in range(8) for k in layer_keys(keys, layer)}
    assert len(derived) == 16 and not derived & set(keys)
    assert layer_keys(keys, 3) == layer_keys(keys, 3)


def test_delete_removes_every_layer(layered, salt, rng) -> None:
    keys = block_keys(np.arange(2 * 16), 16, salt)
    store(layered, keys, pages(rng, 2))
    assert layered.delete(keys) == 2 * LAYERS
    assert layered.lookup(keys) == 0
