"""One request's blocks arriving from kvstore into its pages, layer by layer.

A load never raises into vLLM and never writes a page after it has ended: each layer is
copied into the pages by the thread that fetched it, under the `LayerGets` lock, and ending
a load (done, failed or past its deadline) closes it first. What did not arrive whole, in
every layer, is reported as failed blocks, which vLLM recomputes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from kvstore.client.layers import LayeredKV
from kvstore.integrations.common import whole_buffer
from kvstore.integrations.vllm.pages import PageCache
from kvstore.integrations.vllm.plans import LoadPlan


class Staging:
    """Reused receive buffers, one layer's pages each, for loads over TCP or gRPC: fresh
    memory costs page faults, more than the transfer does. A buffer goes back once its pages
    are copied out; one a failed or abandoned transfer may still write to never does."""

    def __init__(self, pinned: bool = False) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._pinned = pinned  # page-locked, for pages bound for a GPU

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) >= nbytes:
                    return self._free.pop(i)[:nbytes]
        if self._pinned:
            import torch

            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return np.empty(nbytes, np.uint8)

    def give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(whole_buffer(buffer))


class Load:
    """Started at once; `wait(layer)` blocks until that layer's pages are written (or the
    load failed), so attention on layer 0 runs while later layers are still arriving."""

    def __init__(
        self,
        plan: LoadPlan,
        keys: list[bytes],
        layered: LayeredKV,
        pages: PageCache,
        *,
        lease: bool,
        ahead: int,
        timeout_s: float,
        staging: Staging,
        on_error: Callable[[BaseException], None],
        executor: Executor | None = None,
    ) -> None:
        self.plan = plan
        self.started = self.arrived_at = time.monotonic()
        self.waited = 0.0  # seconds the forward pass spent waiting for this load
        self.deadline = self.started + timeout_s
        self._pages = pages
        self._on_error = on_error
        self._good = len(plan.block_ids)  # leading blocks whose every layer is in place
        self._failed = False
        self._ended = False
        self._staging = staging
        self._buffers: dict[int, np.ndarray] = {}  # layer -> its receive buffer, while in use
        out = None if lease else self._buffer
        self._bytes = len(keys) * pages.nbytes
        self._gets = layered.get(
            keys,
            out=out,
            arrived=self._arrived,
            lease=lease,
            ahead=ahead,
            executor=executor,
            wait=plan.wait_s or None,
            fetch=plan.fetch,
        )

    def wait(self, layer: int) -> None:
        """Until layer `layer` is in place, the load failed, or its deadline passed."""
        if self._failed or self._ended:
            return
        start = time.monotonic()
        try:
            self._gets.wait(layer, max(0.0, self.deadline - start))
        except Exception as exc:  # a transfer error or the deadline: these blocks recompute
            self._fail(exc)
        finally:
            self.waited += time.monotonic() - start

    def wait_all(self) -> None:
        for layer in self._pages.layers:
            self.wait(layer)

    def done(self) -> bool:
        """Every layer arrived or the load failed (an async load polls this each step)."""
        if self._failed or time.monotonic() >= self.deadline:
            return True
        return all(self._gets.done(layer) for layer in self._pages.layers)

    def end(self) -> list[int]:
        """Wait for what is left (within the deadline), stop, and return the vLLM block ids
        that were not loaded whole."""
        self.wait_all()
        self._close()
        return self.plan.block_ids[self._good :]

    @property
    def loaded_blocks(self) -> int:
        return self._good

    def _buffer(self, layer: int) -> np.ndarray:
        """In the fetching thread, as the layer's transfer starts."""
        buffer = self._buffers[layer] = self._staging.take(self._bytes)
        return buffer

    def _arrived(self, layer: int, arrays: list[np.ndarray]) -> None:
        """In the fetching thread, under the LayerGets lock: the layer's pages get written."""
        written = self._pages.write(layer, self.plan.block_ids, arrays)
        self._good = min(self._good, written)
        self.arrived_at = time.monotonic()
        if (buffer := self._buffers.pop(layer, None)) is not None:
            self._staging.give_back(buffer)

    def _fail(self, exc: BaseException) -> None:
        self._failed = True
        self._close()
        self._good = 0  # after the close: no arrival can raise it again
        self._on_error(exc)

    def _close(self) -> None:
        if not self._ended:
            self._ended = True
            self._gets.close()  # from here on, nothing writes to the pages
