"""Per-layer transfers: a prompt's blocks stored layer by layer, for engines that run layer by
layer. Each layer of each block is a kvstore block of its own, under `layer_key(block_key,
layer)`, so an engine can save layer l of a step's new blocks as soon as the forward pass has
produced it, and start attention on layer 0 while later layers are still arriving.

A block counts as stored only when every layer of it is (`LayeredKV.lookup`): a producer that
died halfway, or an eviction that took one layer, is a shorter prefix, never a block with a
hole in it. Built only on the public `Client` API.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not yet the builtin on 3.10
from contextlib import ExitStack
from typing import Any

import numpy as np

from kvstore.client.client import Client
from kvstore.client.pipeline import Payload
from kvstore.client.shm import Fill, Lease
from kvstore.client.transport import Out
from kvstore.errors import LeaseExpired, Unavailable
from kvstore.keys import KEY_BYTES, BlockKey
from kvstore.limits import MAX_BLOCKS
from kvstore.results import PutResult

_PERSON = b"kvstore/layer"  # keeps layer keys apart from any chained block key
TIER_ORDER = ("device", "host", "disk")  # nearest first; a block is as far as its farthest layer

# arrived(layer, arrays): the layer's blocks are here (a prefix: fewer at the first missing one)
Arrived = Callable[[int, list[np.ndarray]], None]


def layer_key(block_key: BlockKey, layer: int) -> BlockKey:
    """The key of one layer of a block: a digest of the block's key and the layer index."""
    digest = hashlib.blake2b(block_key, digest_size=KEY_BYTES, person=_PERSON)
    digest.update(layer.to_bytes(4, "little"))
    return digest.digest()


def layer_keys(block_keys: Sequence[BlockKey], layer: int) -> list[BlockKey]:
    return [layer_key(key, layer) for key in block_keys]


class LayeredKV:
    """A prompt's blocks, layer by layer, through one `Client` (thread-safe, as it is).

    `layers`: the layer indexes an engine stores (all of them, or one pipeline stage's).
    Calls that take several chains of block keys (`lookup(chain_a, chain_b)`) count a block
    only when it is stored in every chain: one chain per tensor-parallel rank, for example.
    """

    def __init__(self, client: Client, layers: int | Sequence[int]) -> None:
        self.client = client
        self.layers = list(range(layers)) if isinstance(layers, int) else list(layers)
        if not self.layers:
            raise ValueError("layers: must name at least one layer")

    def lookup(self, block_keys: Sequence[BlockKey], *chains: Sequence[BlockKey]) -> int:
        """How many leading blocks have every layer stored (in every chain)."""
        return len(self.lookup_tiers(block_keys, *chains))

    def lookup_tiers(
        self, block_keys: Sequence[BlockKey], *others: Sequence[BlockKey]
    ) -> list[str]:
        """For each leading block with every layer stored, the farthest tier holding one."""
        chains = (block_keys, *others)
        if not block_keys:
            return []
        pieces = len(chains) * len(self.layers)
        tiers = self.client.lookup_tiers(self._keys(chains, range(len(block_keys))))
        return [
            max(tiers[b * pieces : (b + 1) * pieces], key=_tier_rank)
            for b in range(len(tiers) // pieces)
        ]

    def locate(self, block_keys: Sequence[BlockKey], *others: Sequence[BlockKey]) -> int:
        """How many leading blocks, every layer of them (in every chain), one node of the
        cluster holds, this one included (`Client.locate`: the best holder's count), for a
        load through this node with `fetch`."""
        chains = (block_keys, *others)
        pieces = len(chains) * len(self.layers)
        per_request = max(1, MAX_BLOCKS // pieces)
        held = 0
        for start in range(0, len(block_keys), per_request):
            keys = self._keys(chains, range(start, min(start + per_request, len(block_keys))))
            matched = max((where.matched for where in self.client.locate(keys)), default=0)
            held += matched // pieces
            if matched < len(keys):
                break
        return held

    def put(
        self,
        block_keys: Sequence[BlockKey],
        layer: int,
        payloads: Sequence[Payload],
        *,
        codec: str | None = None,
        layout: str | None = None,
    ) -> PutResult:
        """Store layer `layer` of each block (one payload per block key)."""
        return self.client.put(layer_keys(block_keys, layer), payloads, codec=codec, layout=layout)

    def put_in_place(
        self,
        block_keys: Sequence[BlockKey],
        layer: int,
        dtype: np.dtype,
        shape: tuple[int, ...],
        fill: Fill,
        *,
        layout: str | None = None,
    ) -> PutResult:
        """`Client.put_in_place` of layer `layer` of each block: `fill` writes the node's
        shared arena directly (same host only)."""
        keys = layer_keys(block_keys, layer)
        return self.client.put_in_place(keys, dtype, shape, fill, layout=layout)

    def get(
        self,
        block_keys: Sequence[BlockKey],
        *,
        out: Sequence[Out] | Callable[[int], Out] | None = None,
        arrived: Arrived | None = None,
        lease: bool = False,
        ahead: int = 2,
        executor: Executor | None = None,
        wait: float | None = None,
        fetch: bool = False,
    ) -> LayerGets:
        """Start getting every layer of the present prefix of `block_keys`, layer by layer in
        order, `ahead` layers at a time; `LayerGets.wait(layer)` hands back a layer as soon as
        it has arrived. `out[i]` receives layer `self.layers[i]` (see `Client.get`), or
        `out(layer)` is asked for the buffer as the layer's transfer starts (so a few reused
        buffers can serve many layers); `arrived(layer, arrays)` runs in the fetching thread
        before the layer is handed back.

        `lease` (same host): lease each layer's blocks in the node's shared arena and hand out
        zero-copy views of them, valid until the `LayerGets` is closed. `executor`: run the
        transfers there (first in, first out) instead of in threads of the load's own.
        `wait`, `fetch`: as for `Client.get`, each layer's request (a producer still saving;
        blocks on other nodes of the cluster). A lease waits for its first key only."""
        ask = {"wait": wait, "fetch": fetch}
        return LayerGets(self, list(block_keys), out, arrived, lease, ahead, executor, ask)

    def _keys(self, chains: Sequence[Sequence[BlockKey]], blocks: range) -> list[BlockKey]:
        """Block-major: every layer of block b in every chain, before block b + 1."""
        return [
            layer_key(chain[b], layer) for b in blocks for chain in chains for layer in self.layers
        ]

    def delete(self, block_keys: Sequence[BlockKey]) -> int:
        """Remove every layer of the blocks; returns how many layer blocks were present."""
        keys = [layer_key(key, layer) for key in block_keys for layer in self.layers]
        return sum(
            self.client.delete(keys[i : i + MAX_BLOCKS]) for i in range(0, len(keys), MAX_BLOCKS)
        )


class LayerGets:
    """The layers of one load, arriving in layer order. Use it as a context manager: once
    `close()` returns, `arrived` is never called again and leased views are released, so a
    caller that gave up on a slow load may reuse what `arrived` writes to.

    Gets go one layer per request, `ahead` at a time. Leases go in groups of layers that
    double in size (1, 1, 2, 4, ... layers a request): the first layer is there after one
    short round trip, and the rest cost a few requests, not one per layer."""

    def __init__(
        self,
        layered: LayeredKV,
        block_keys: list[BlockKey],
        out: Sequence[Out] | Callable[[int], Out] | None,
        arrived: Arrived | None,
        lease: bool,
        ahead: int,
        executor: Executor | None,
        ask: dict[str, Any],
    ) -> None:
        self._layered = layered
        self._keys = block_keys
        self._ask = ask  # wait and fetch, for every request
        self._arrived = arrived
        self._lock = threading.Lock()  # held while `arrived` runs; close() takes it
        self._closed = False
        self._leases = ExitStack()
        self._own_pool = executor is None
        self._pool = executor or ThreadPoolExecutor(max(1, ahead), thread_name_prefix="kvstore-lay")
        layers = layered.layers
        if out is None or callable(out):
            self._out: Callable[[int], Out] = out or (lambda layer: None)
        elif len(out) != len(layers):
            raise ValueError(f"out: {len(out)} buffers for {len(layers)} layers")
        else:
            self._out = dict(zip(layers, out, strict=True)).__getitem__
        self._done: dict[int, Future[list[np.ndarray]]] = {layer: Future() for layer in layers}
        groups = _doubling(layers) if lease else [[layer] for layer in layers]
        fetch = self._lease_group if lease else self._get_layer
        for group in groups:
            self._pool.submit(self._fetch, fetch, group)

    def wait(self, layer: int, timeout: float | None = None) -> list[np.ndarray]:
        """Layer `layer`'s blocks, a prefix of those asked for (shorter at the first block
        not stored), once arrived; raises what its transfer raised, `CancelledError` once
        closed, or `Unavailable` after `timeout` seconds."""
        future = self._done[layer]
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise Unavailable(f"layer {layer} did not arrive within {timeout}s") from None

    def done(self, layer: int) -> bool:
        return self._done[layer].done()

    def close(self) -> None:
        """Stop: layers not started are not fetched, `arrived` is not called again."""
        with self._lock:
            self._closed = True
            for future in self._done.values():
                future.cancel()  # those already fetched keep their result
            self._leases.close()
        if self._own_pool:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> LayerGets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch(self, fetch: Callable[[list[int]], None], group: list[int]) -> None:
        """In a pool thread: the group's layers, each handed over as it comes."""
        if self._closed:
            return
        try:
            fetch(group)
        except BaseException as exc:  # the group's layers not handed over yet carry it
            with self._lock:
                for layer in group:
                    if not self._done[layer].done():
                        self._done[layer].set_exception(exc)

    def _get_layer(self, group: list[int]) -> None:
        (layer,) = group
        keys = layer_keys(self._keys, layer)
        arrays = self._layered.client.get(keys, out=self._out(layer), **self._ask)
        self._hand_over(layer, arrays)

    def _lease_group(self, group: list[int]) -> None:
        """The group's layers leased in the node's arena, block-major (a block missing in
        one layer ends the prefix for all of them), in requests of at most MAX_BLOCKS keys;
        held until close, or released at once when taken after it."""
        per_request = max(1, MAX_BLOCKS // len(group))
        views: list[np.ndarray] = []
        taken: list[Lease] = []
        leases = ExitStack()
        with leases:
            for start in range(0, len(self._keys), per_request):
                chunk = self._keys[start : start + per_request]
                keys = [layer_key(key, layer) for key in chunk for layer in group]
                taken.append(leases.enter_context(self._layered.client.lease(keys, **self._ask)))
                views += taken[-1].blocks
                if len(taken[-1]) < len(keys):
                    break
            with self._lock:
                if self._closed:
                    return  # leaving `with` releases them
                self._leases.push(leases.pop_all())
        whole = len(views) // len(group)
        held = lambda: all(lease.active for lease in taken)  # noqa: E731
        for i, layer in enumerate(group):
            self._hand_over(layer, [views[b * len(group) + i] for b in range(whole)], held)

    def _hand_over(
        self, layer: int, arrays: list[np.ndarray], held: Callable[[], bool] = lambda: True
    ) -> None:
        """`held()`: the leased views are still pinned, checked once `arrived` copied them."""
        with self._lock:
            if self._closed:
                return
            if self._arrived is not None:
                self._arrived(layer, arrays)
            if not held():  # ended during the copy: its bytes may be another block's by now
                raise LeaseExpired(f"layer {layer}: the lease ended while its blocks were read")
            self._done[layer].set_result(arrays)


def _doubling(layers: list[int]) -> list[list[int]]:
    """[l0], [l1], [l2, l3], [l4 .. l7], ...: consecutive groups, each as large as all
    before it."""
    groups, start = [], 0
    while start < len(layers):
        size = max(1, start)
        groups.append(layers[start : start + size])
        start += size
    return groups


def _tier_rank(tier: str) -> int:
    return TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER)
