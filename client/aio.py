"""The asyncio client: the same calls as `Client`, awaitable.

Every call runs the sync client's own code in a small pool of threads, so the event loop
never blocks on a transfer and both clients behave alike, shared memory, leases and
in-place puts included (the GIL is released inside every socket call, copy and codec).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from kvstore.client.client import Client
from kvstore.client.pipeline import Payload
from kvstore.client.shm import Fill, Lease
from kvstore.client.transport import Out
from kvstore.keys import BlockKey
from kvstore.results import Batch, Location, NodeInfo, PushResult, PutResult, StoreStats

T = TypeVar("T")
CALLS_AT_ONCE = 8  # calls of one AsyncClient that run concurrently


class AsyncClient:
    """See `kvstore.client.Client`: the same arguments, and every method a coroutine
    (`lease` returns a `Lease` to use with `async with`)."""

    def __init__(self, address: str, **options: Any) -> None:
        self.client = Client(address, **options)
        self._calls = ThreadPoolExecutor(CALLS_AT_ONCE, thread_name_prefix="kvstore-async")

    async def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        *,
        codec: str | None = None,
        layout: str | None = None,
        durable: bool = False,
    ) -> PutResult:
        return await self._run(
            self.client.put, keys, payloads, codec=codec, layout=layout, durable=durable
        )

    async def put_in_place(
        self,
        keys: Sequence[BlockKey],
        dtype: np.dtype,
        shape: tuple[int, ...],
        fill: Fill,
        *,
        layout: str | None = None,
    ) -> PutResult:
        return await self._run(self.client.put_in_place, keys, dtype, shape, fill, layout=layout)

    async def get(
        self,
        keys: Sequence[BlockKey],
        *,
        out: Out = None,
        wait: float | None = None,
        fetch: bool = False,
    ) -> list[np.ndarray]:
        return await self._run(self.client.get, keys, out=out, wait=wait, fetch=fetch)

    async def register(self, buffer: object) -> None:
        await self._run(self.client.register, buffer)

    async def lease(
        self, keys: Sequence[BlockKey], *, wait: float | None = None, fetch: bool = False
    ) -> Lease:
        return await self._run(self.client.lease, keys, wait=wait, fetch=fetch)

    async def prefetch(self, keys: Sequence[BlockKey]) -> int:
        return await self._run(self.client.prefetch, keys)

    async def lookup(
        self, keys: Sequence[BlockKey], *, wait: float | None = None, fetch: bool = False
    ) -> int:
        return await self._run(self.client.lookup, keys, wait=wait, fetch=fetch)

    async def lookup_tiers(
        self, keys: Sequence[BlockKey], *, wait: float | None = None, fetch: bool = False
    ) -> list[str]:
        return await self._run(self.client.lookup_tiers, keys, wait=wait, fetch=fetch)

    async def lookup_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> int:
        return await self._run(self.client.lookup_tokens, token_ids, block_size, salt)

    async def delete(self, keys: Sequence[BlockKey]) -> int:
        return await self._run(self.client.delete, keys)

    async def push(
        self, keys: Sequence[BlockKey], target: str, transport: str = "auto"
    ) -> PushResult:
        return await self._run(self.client.push, keys, target, transport)

    async def locate(self, keys: Sequence[BlockKey]) -> list[Location]:
        return await self._run(self.client.locate, keys)

    async def locate_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> list[Location]:
        return await self._run(self.client.locate_tokens, token_ids, block_size, salt)

    async def watch(self, from_sequence: int | None = None) -> AsyncIterator[Batch]:
        batches = self.client.watch(from_sequence)
        while (batch := await self._run(next, batches, None)) is not None:
            yield batch

    async def stats(self) -> StoreStats:
        return await self._run(self.client.stats)

    async def node_info(self) -> NodeInfo:
        return await self._run(self.client.node_info)

    async def close(self) -> None:
        await self._run(self.client.close)
        self._calls.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._calls, functools.partial(call, *args, **kwargs))
