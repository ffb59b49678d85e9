"""The device tier: blocks in one preallocated pool of accelerator memory, above host DRAM.

Blocks move between host and device in batches, because per-block copies of
small blocks run far below the link's bulk rate. A batch going up gets one
extent of the pool when a hole fits it, so blocks that lie back to back in host
memory (as consecutive puts do in the arena) go up in one copy, and come back
down in one. Where the pool side is fragmented, one gather (down) or scatter
(up) kernel on the device packs the blocks through a scratch buffer around that
one copy. Host memory the daemon moves through (its arena) is page-locked once
with `register_host`, so the copies are DMA at full link speed.

torch is imported only when this tier is built: the core runs without it. The
tier also runs on torch's CPU device, which is how CI tests the hierarchy.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np

from kvstore.arena import Extents, aligned
from kvstore.errors import ResourceExhausted
from kvstore.keys import BlockKey
from kvstore.lru import LRU
from kvstore.meta import BlockMeta
from kvstore.results import TierStats
from kvstore.tiers import Changes, present_count


@dataclass(slots=True)
class _Slot:
    offset: int
    meta: BlockMeta


def device_available(device: str) -> bool:
    """True when torch is installed and `device` exists here."""
    try:
        import torch
    except ImportError:
        return False
    if device.startswith("cuda"):
        return torch.cuda.is_available()
    return device == "cpu"


class DeviceTier:
    """Not thread-safe for moves: the Store runs one move at a time; lookups are."""

    name = "device"

    def __init__(self, capacity: int, device: str = "cuda") -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self._extents = Extents(capacity)
        self.capacity = self._extents.capacity
        self.pool = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self._scratch = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._slots: dict[BlockKey, _Slot] = {}
        self._lru = LRU()
        self._lock = threading.Lock()  # the index; moves are serialized by the caller
        self._stats = TierStats(self.name, capacity=self.capacity)
        self.changes = Changes(self.name)

    # -- index ---------------------------------------------------------------

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._slots

    def present_prefix(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            return present_count(keys, self._slots)

    def meta(self, key: BlockKey) -> BlockMeta | None:
        with self._lock:
            slot = self._slots.get(key)
            return slot.meta if slot else None

    def free_bytes(self) -> int:
        with self._lock:
            return self.capacity - self._extents.used

    def victims(self, size: int) -> list[tuple[BlockKey, BlockMeta]]:
        """The least recently used blocks to move down so `size` more bytes fit."""
        with self._lock:
            need = aligned(size) - (self.capacity - self._extents.used)
            out = []
            for key in self._lru:
                if need <= 0:
                    break
                out.append((key, self._slots[key].meta))
                need -= aligned(self._slots[key].meta.size)
            return out

    def listing(self) -> list[BlockKey]:
        with self._lock:
            return list(self._slots)

    def delete(self, keys: Sequence[BlockKey], *, demoted: bool = False) -> int:
        """Forget blocks; `demoted`: they were copied down, count them as demotions."""
        with self._lock:
            present = [k for k in dict.fromkeys(keys) if k in self._slots]
            for key in present:
                slot = self._slots.pop(key)
                self._lru.remove(key)
                self._extents.release(slot.offset, slot.meta.size)
                self._stats.blocks -= 1
                self._stats.bytes -= aligned(slot.meta.size)
                self._stats.payload_bytes -= slot.meta.size
                self.changes.removed(key)
            self._stats.demotions += len(present) if demoted else 0
        self.changes.report()
        return len(present)

    def stats(self) -> TierStats:
        with self._lock:
            return self._stats.snapshot()

    # -- moves ---------------------------------------------------------------

    def put_batch(self, blocks: Sequence[tuple[BlockKey, BlockMeta, memoryview]]) -> int:
        """Copy blocks up into the pool; returns how many were new. The caller made room."""
        with self._lock:
            new = [b for b in blocks if b[0] not in self._slots]
            sizes = [meta.size for _, meta, _ in new]
            offsets = self._alloc(sizes)
        if not new:
            return 0
        self._move([view for *_, view in new], offsets, sizes, up=True)
        with self._lock:
            self._slots.update(
                (key, _Slot(o, meta)) for (key, meta, _), o in zip(new, offsets, strict=True)
            )
            for key, _, _ in new:
                self._lru.on_put(key)
                self.changes.stored(key)
            self._stats.blocks += len(new)
            self._stats.bytes += sum(aligned(size) for size in sizes)
            self._stats.payload_bytes += sum(sizes)
        self.changes.report()
        return len(new)

    def read_batch(
        self, keys: Sequence[BlockKey], outs: Sequence[memoryview], *, hit: bool = True
    ) -> list[BlockMeta]:
        """Copy blocks down into `outs` (one per key, each at least the block's size);
        returns the metadata of those still here, a prefix of `keys`. `hit`: a
        reader's access, counted and made warm (a demotion is neither)."""
        with self._lock:
            slots = []
            for key in keys:
                if (slot := self._slots.get(key)) is None:
                    self._stats.misses += int(hit)
                    break
                slots.append(slot)
                if hit:
                    self._lru.on_hit(key)
            self._stats.hits += len(slots) if hit else 0
        if slots:
            sizes = [s.meta.size for s in slots]
            outs = [out[:size] for out, size in zip(outs, sizes, strict=False)]
            self._move(outs, [s.offset for s in slots], sizes, up=False)
        return [s.meta for s in slots]

    def _alloc(self, sizes: list[int]) -> list[int]:
        """Pool offsets for a batch (lock held): one extent if a hole fits it, so the
        batch moves in one copy; else one extent per block."""
        spans = [aligned(size) for size in sizes]
        start = self._extents.alloc(sum(spans)) if sizes else None
        if start is not None:
            return list(accumulate(spans[:-1], initial=start))
        offsets = [self._extents.alloc(size) for size in sizes]
        placed = [(o, size) for o, size in zip(offsets, sizes, strict=True) if o is not None]
        if len(placed) < len(sizes):
            for offset, size in placed:
                self._extents.release(offset, size)
            raise ResourceExhausted("no room in the device tier for this batch")
        return [offset for offset, _ in placed]

    def _move(
        self, hosts: Sequence[memoryview], offsets: list[int], sizes: list[int], *, up: bool
    ) -> None:
        """One copy per run of blocks back to back both in host memory and in the pool.
        Host blocks back to back but pool blocks apart take one copy and one gather
        (down) or scatter (up) kernel on the device, through a scratch buffer."""
        runs = _runs(hosts, offsets, sizes)
        if len(runs) > 1 and len(host_runs := _runs(hosts, None, sizes)) == 1:
            host = self._tensor(host_runs[0][0])
            scratch = self._scratch_for(len(host))[: len(host)]
            pieces = [self.pool[o : o + s] for o, s in zip(offsets, sizes, strict=True)]
            if up:
                scratch.copy_(host, non_blocking=True)
                self._torch._foreach_copy_(pieces, list(scratch.split(sizes)))
            else:
                host.copy_(self._torch.cat(pieces, out=scratch), non_blocking=True)
        else:
            for host_view, offset, length in runs:
                host, pool = self._tensor(host_view), self.pool[offset : offset + length]
                (pool if up else host).copy_(host if up else pool, non_blocking=True)
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def _tensor(self, view: memoryview) -> Any:
        with warnings.catch_warnings():  # a read-only source is only read
            warnings.simplefilter("ignore", UserWarning)
            return self._torch.frombuffer(view, dtype=self._torch.uint8)

    def register_host(self, memory: memoryview) -> None:
        """Page-lock host memory so copies to and from it run as DMA (CUDA only)."""
        if self.device.type != "cuda":
            return
        code = self._torch.cuda.cudart().cudaHostRegister(_address(memory), len(memory), 0)
        if int(code) != 0:
            raise RuntimeError(f"cudaHostRegister failed with error {int(code)}")

    def _scratch_for(self, size: int) -> Any:
        if len(self._scratch) < size:
            self._scratch = self._torch.empty(size, dtype=self._torch.uint8, device=self.device)
        return self._scratch


def _runs(
    hosts: Sequence[memoryview], offsets: list[int] | None, sizes: list[int]
) -> list[tuple[memoryview, int, int]]:
    """(host view, pool offset, length) of each run of blocks back to back in one host
    buffer and, unless `offsets` is None, in the pool."""
    addresses = [_address(view) for view in hosts]
    runs = []
    start = 0
    for i in range(1, len(hosts) + 1):
        if (
            i < len(hosts)
            and addresses[i] == addresses[i - 1] + sizes[i - 1]
            and hosts[i].obj is hosts[start].obj
            and (offsets is None or offsets[i] == offsets[i - 1] + sizes[i - 1])
        ):
            continue
        first, length = hosts[start], addresses[i - 1] + sizes[i - 1] - addresses[start]
        if i - start > 1:
            whole = memoryview(first.obj).cast("B")
            first = whole[addresses[start] - _address(whole) :][:length]
        runs.append((first, offsets[start] if offsets else 0, length))
        start = i
    return runs


def _address(view: memoryview) -> int:
    try:  # the fast way, for writable memory
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:
        return np.frombuffer(view, np.uint8).ctypes.data
