"""The device tier: blocks in one preallocated pool of accelerator memory, above host DRAM.

Blocks move between host and device in batches, because per-block copies of
small blocks run far below the link's bulk rate:
- up: each run of blocks contiguous in host memory is one host-to-device copy
  into a device scratch buffer, then one fused multi-tensor copy scatters the
  blocks into their extents of the pool;
- down: one gather kernel (`torch.cat`) packs the blocks into the scratch
  buffer, then one device-to-host copy lands them in host memory.
Host memory the daemon moves through (its arena) is page-locked once with
`register_host`, so these copies are DMA at full link speed.

torch is imported only when this tier is built: the core runs without it. The
tier also runs on torch's CPU device, which is how CI tests the hierarchy.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.arena import Extents, aligned
from kvstore.errors import ResourceExhausted
from kvstore.keys import BlockKey
from kvstore.lru import LRU
from kvstore.meta import BlockMeta
from kvstore.tiers import TierStats


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
        self._staging = memoryview(b"")  # page-locked bounce buffer for scattered reads
        self._slots: dict[BlockKey, _Slot] = {}
        self._lru = LRU()
        self._lock = threading.Lock()  # the index; moves are serialized by the caller
        self._stats = TierStats(self.name, capacity=self.capacity)

    # -- index ---------------------------------------------------------------

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._slots

    def present_prefix(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            n = 0
            while n < len(keys) and keys[n] in self._slots:
                n += 1
            return n

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
                self._stats.bytes -= slot.meta.size
            self._stats.demotions += len(present) if demoted else 0
            return len(present)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**{f: getattr(self._stats, f) for f in TierStats.__slots__})

    # -- moves ---------------------------------------------------------------

    def put_batch(self, blocks: Sequence[tuple[BlockKey, BlockMeta, memoryview]]) -> int:
        """Copy blocks up into the pool; returns how many were new. The caller made room."""
        with self._lock:
            new = [b for b in blocks if b[0] not in self._slots]
            offsets = [self._extents.alloc(meta.size) for _, meta, _ in new]
            if None in offsets:
                for offset, (_, meta, _) in zip(offsets, new, strict=True):
                    if offset is not None:
                        self._extents.release(offset, meta.size)
                raise ResourceExhausted("no room in the device tier for this batch")
        if not new:
            return 0
        sizes = [meta.size for _, meta, _ in new]
        scratch = self._scratch_for(sum(sizes))
        at = 0
        for run in _contiguous_runs([view for *_, view in new]):  # one copy per run
            with warnings.catch_warnings():  # read-only sources are only read
                warnings.simplefilter("ignore", UserWarning)
                source = self._torch.frombuffer(run, dtype=self._torch.uint8)
            scratch[at : at + len(run)].copy_(source, non_blocking=True)
            at += len(run)
        parts = scratch[:at].split(sizes)
        dests = [self.pool[o : o + s] for o, s in zip(offsets, sizes, strict=True)]
        self._torch._foreach_copy_(dests, list(parts))
        self._sync()
        with self._lock:
            for (key, meta, _), offset in zip(new, offsets, strict=True):
                self._slots[key] = _Slot(offset, meta)
                self._lru.on_put(key)
                self._stats.blocks += 1
                self._stats.bytes += meta.size
        return len(new)

    def read_batch(
        self, keys: Sequence[BlockKey], outs: Sequence[memoryview], *, hit: bool = True
    ) -> list[BlockMeta]:
        """Copy blocks down into `outs` (one per key, each at least the block's size);
        returns the metadata of those still here, a prefix of `keys`. Page-locked
        `outs` that lie back to back take one copy (see `register_host`). `hit`: a
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
        if not slots:
            return []
        sizes = [s.meta.size for s in slots]
        pieces = [self.pool[s.offset : s.offset + s.meta.size] for s in slots]
        packed = self._torch.cat(pieces, out=self._scratch_for(sum(sizes))[: sum(sizes)])
        outs = [out[:size] for out, size in zip(outs, sizes, strict=False)]
        runs = _contiguous_runs(outs)
        target = runs[0] if len(runs) == 1 else self._staging_for(sum(sizes))
        self._torch.frombuffer(target, dtype=self._torch.uint8).copy_(packed, non_blocking=True)
        self._sync()
        if len(runs) > 1:
            at = 0
            for out in outs:
                out[:] = target[at : at + len(out)]
                at += len(out)
        return [s.meta for s in slots]

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

    def _staging_for(self, size: int) -> memoryview:
        if len(self._staging) < size:
            pinned = self.device.type == "cuda"
            tensor = self._torch.empty(size, dtype=self._torch.uint8, pin_memory=pinned)
            self._staging = memoryview(tensor.numpy())
        return self._staging[:size]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)


def _contiguous_runs(views: Sequence[memoryview]) -> list[memoryview]:
    """Merge views lying back to back in one buffer, so that each run is one copy."""
    runs: list[list[Any]] = []  # [buffer, address, length, first view]
    for view in views:
        address = _address(view)
        last = runs[-1] if runs else None
        if last and last[0] is view.obj and last[1] + last[2] == address:
            last[2] += len(view)
        else:
            runs.append([view.obj, address, len(view), view])
    merged = []
    for buffer, address, length, first in runs:
        if length != len(first):
            whole = memoryview(buffer).cast("B")
            first = whole[address - _address(whole) :][:length]
        merged.append(first)
    return merged


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data
