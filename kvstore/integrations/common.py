"""What every engine adapter shares, so each adapter is only its engine's plug points.

- The node guard: a node that is down, slow or wrong costs an engine one timeout, a log line
  and a count, never a request (`NodeGuard`), and blocks that come back are checked against
  the engine's cache before any is loaded (`verified_prefix`, `check_blocks`); the settings
  every adapter has are checked alike (`check_settings`).
- Tensor views: numpy over a tensor's own memory and back, no copy (`as_numpy`, `as_tensor`).
- GPU staging: device memory to and from the node through pinned host memory
  (`HostStaging`), or straight into the node's shared arena, page-locked once
  (`locked_arena`, `arena_fill`, `copy_from_arena`): one DMA per run of adjacent blocks.

torch is imported where a tensor is at hand, so the guard works without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from kvstore.client import Client
from kvstore.client.shm import Fill
from kvstore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvstore.integrations")
T = TypeVar("T")

# -- the node guard ----------------------------------------------------------------------


def check_settings(transport: str, transports: Sequence[str], **positive: float) -> None:
    """The settings every adapter has: a path it can take, and times (seconds) above 0."""
    if transport not in transports:
        raise ValueError(f"transport: must be one of {', '.join(transports)}")
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name}: must be > 0")


class NodeGuard:
    """One node as one side of an engine adapter sees it: after a failure the node is left
    alone for `retry_after_s` (every request misses, no saves are tried) instead of stalling
    each request in turn. Thread-safe."""

    def __init__(self, address: str, side: str, retry_after_s: float, **client_options: Any):
        """`client_options`: what `Client` is opened with (transport, timeout, codec...)."""
        self.address = address
        self.side = side
        self.retry_after_s = retry_after_s
        self._client_options = client_options
        self._client: Client | None = None
        self._down_until = 0.0
        self._failures = 0
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    @property
    def client(self) -> Client:
        """Opened on first use, in the process (and thread) that uses it."""
        with self._lock:
            if self._client is None:
                self._client = Client(self.address, **self._client_options)
            return self._client

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def call(self, doing: str, call: Callable[[], T], fallback: T) -> T:
        """`call()`, or `fallback` when it fails or the node is being left alone."""
        if not self.available():
            self.counts[f"{doing}_skipped"] += 1
            return fallback
        try:
            result = call()
        except Exception as exc:  # anything from the node ends in a recompute, never in the engine
            self.failed(doing, exc)
            return fallback
        self.succeeded()
        return result

    def failed(self, doing: str, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            first = self._failures == 1
            self._down_until = time.monotonic() + self.retry_after_s
        self.counts[f"{doing}_failed"] += 1
        (log.warning if first else log.debug)(
            "kvstore %s (%s side, pid %d): %s failed, recomputing instead and leaving the "
            "node alone for %gs: %s: %s",
            self.address,
            self.side,
            os.getpid(),
            doing,
            self.retry_after_s,
            type(exc).__name__,
            exc,
        )

    def succeeded(self) -> None:
        if self._failures and self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.info("kvstore %s (%s side): reachable again", self.address, self.side)

    def take_counts(self) -> Counter[str]:
        """The counts so far, and zero from here (swapped: other threads keep counting)."""
        counts, self.counts = self.counts, Counter()
        return counts

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def verified_prefix(blocks: Sequence[np.ndarray], dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """How many leading `blocks` have the dtype and shape the engine's cache holds: a block
    stored under the right key by another model or layout is never loaded as garbage."""
    wrong = (i for i, block in enumerate(blocks) if block.dtype != dtype or block.shape != shape)
    return next(wrong, len(blocks))


def check_blocks(
    blocks: Sequence[np.ndarray], dtype: np.dtype, shape: tuple[int, ...], first: int = 0
) -> None:
    """`verified_prefix` as an error naming the first block that is not (`blocks[0]` is block
    `first` of the request)."""
    good = verified_prefix(blocks, dtype, shape)
    if good < len(blocks):
        block = blocks[good]
        raise InvalidArgument(
            f"blocks[{first + good}]",
            f"stored as {block.dtype}{list(block.shape)}, this model "
            f"needs {dtype}{list(shape)}: another model or layout",
        )


def unpin_thread() -> None:
    """Engines pin their compute threads to their cores, and new threads inherit that; an
    adapter's I/O threads may run on any core (on a small machine, the one the engine keeps
    for its scheduler), so they take no time from the forward pass's own core."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or a cpuset forbids it
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


# -- tensor views ------------------------------------------------------------------------


@functools.cache
def _carriers() -> dict[torch.dtype, tuple[torch.dtype, np.dtype]]:
    """torch dtypes numpy lacks: the integer dtype that carries their bits, and ml_dtypes'."""
    import ml_dtypes
    import torch

    return {
        torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
        torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
        torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
    }


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """numpy's name for a torch dtype (16- and 8-bit floats through ml_dtypes)."""
    import torch

    carried = _carriers().get(dtype)
    return carried[1] if carried else torch.empty(0, dtype=dtype).numpy().dtype


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy over the same memory."""
    carried = _carriers().get(tensor.dtype)
    return tensor.view(carried[0]).numpy().view(carried[1]) if carried else tensor.numpy()


def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array as a CPU tensor over the same memory, `dtype` where numpy has no name
    for it (the inverse of `as_numpy`)."""
    import torch

    carried = _carriers().get(dtype)
    if carried is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(numpy_dtype(carried[0]))).view(dtype)


# -- GPU staging -------------------------------------------------------------------------


class HostStaging:
    """Host memory reused across calls, pinned while the tensors it carries live on a GPU,
    so the copy to or from the device is one DMA at full speed (fresh memory costs page
    faults, pinning more). One user at a time: what it hands out is valid until the next
    call."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """`nbytes` of uint8, pinned for a CUDA `device`."""
        import torch

        pinned = device.type == "cuda"
        buffer = self._buffer
        if buffer is None or buffer.numel() < nbytes or buffer.is_pinned() != pinned:
            buffer = self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return buffer[:nbytes]

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """`tensor` copied once, in one batch, into the buffer, as numpy without a further
        copy."""
        tensor = tensor.contiguous()
        host = self.take(tensor.numel() * tensor.element_size(), tensor.device)
        host = host.view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor)
        return as_numpy(host)


def locked_arena(client: Client) -> np.ndarray | None:
    """The node's arena as mapped here, page-locked once if CUDA allows (copies to and from
    it then run as DMA), or None (another host, no CUDA: those take the staging path)."""
    import torch

    if not torch.cuda.is_available():
        return None
    arena = client.shared_arena()
    if arena is not None:
        _page_lock(arena)
    return arena


def arena_fill(blocks: torch.Tensor, count: int, arena: np.ndarray) -> Fill:
    """A `Client.put_in_place` fill for `count` equal blocks lying back to back in `blocks`
    (device memory): the device writes each run of adjacent slots in `arena` in one DMA."""
    import torch

    flat = blocks.contiguous().view(-1).view(torch.uint8)
    per_block = flat.numel() // count

    def fill(indexes: list[int], slots: list[np.ndarray]) -> Callable[[], None]:
        for first, n, run in _runs(arena, slots):
            # adjacent slots may hold blocks that are not (a block the node has is skipped)
            for at, count in _consecutive(indexes[first : first + n]):
                start, into = indexes[first + at] * per_block, at * per_block
                torch.frombuffer(run[into : into + count * per_block], dtype=torch.uint8).copy_(
                    flat[start : start + count * per_block], non_blocking=True
                )
        copied = torch.cuda.Event()
        copied.record()
        return copied.synchronize  # the client publishes the part after this

    return fill


def whole_buffer(array: np.ndarray) -> np.ndarray:
    """The buffer `array` is a slice of (to reuse it whole, or find runs within it)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _consecutive(indexes: list[int]) -> list[tuple[int, int]]:
    """(position, length) of each run of consecutive values in `indexes`."""
    runs: list[tuple[int, int]] = []
    for i, index in enumerate(indexes):
        if runs and index == indexes[runs[-1][0]] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def copy_from_arena(
    arena: np.ndarray, blocks: Sequence[np.ndarray], out: torch.Tensor, at: int
) -> int:
    """Start copying `blocks` (leased, most of them back to back in `arena`) into the device
    bytes `out[at:]`, one DMA per run; returns where the next block goes. Synchronize before
    the lease ends: the node may reuse the slots then."""
    import torch

    for _, _, run in _runs(arena, blocks):
        out[at : at + run.nbytes].copy_(torch.from_numpy(run), non_blocking=True)
        at += run.nbytes
    return at


_LOCKED: dict[int, int] = {}  # id -> address of each arena mapping page-locked here


def _page_lock(arena: np.ndarray) -> None:
    """Page-lock a mapping of the node's arena once, so copies to and from it are DMA, and
    unlock it when the mapping goes: a later mapping at the same address must not find a
    stale registration. A failure only makes copies slower (the driver stages them)."""
    import torch

    if id(arena) in _LOCKED:
        return
    cudart, address = torch.cuda.cudart(), arena.ctypes.data
    code = int(cudart.cudaHostRegister(address, arena.nbytes, 0))
    if code != 0:
        cudart.cudaGetLastError()  # clear it, or the next kernel launch reports it
        log.warning("could not page-lock the node's arena (CUDA error %d)", code)
        return
    _LOCKED[id(arena)] = address
    weakref.finalize(arena, _page_unlock, id(arena), address)


def _page_unlock(key: int, address: int) -> None:
    import torch

    _LOCKED.pop(key, None)
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostUnregister(address)) != 0:
        cudart.cudaGetLastError()


def _runs(arena: np.ndarray, blocks: Sequence[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    """(first block, block count, writable bytes) of each run of blocks lying back to back
    in `arena`; a block elsewhere (e.g. decoded) is a run of its own."""
    base, end = arena.ctypes.data, arena.ctypes.data + arena.nbytes
    runs: list[list] = []  # [first, count, start address, length]
    for i, block in enumerate(blocks):
        address = block.ctypes.data
        last = runs[-1] if runs else None
        if last and last[2] >= 0 and last[2] + last[3] == address and address + block.nbytes <= end:
            last[1] += 1
            last[3] += block.nbytes
        else:
            inside = base <= address < end
            runs.append([i, 1, address if inside else -1, block.nbytes, block])
    return [
        (first, count, arena[start - base : start - base + length] if start >= 0 else
         np.ascontiguousarray(rest[0]).reshape(-1).view(np.uint8))
        for first, count, start, length, *rest in runs
    ]  # fmt: skip
