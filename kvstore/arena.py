"""A fixed region of memory carved into variable-size extents.

The host tier preallocates its whole capacity once, at start-up, and places
every block in an extent of it: no per-block Python objects own payload bytes,
and a slot can be written in place by a network receive. Free extents are
coalesced on release, so after evicting a neighbour the merged hole is
checked first (O(1) per eviction, no rescan).
"""

from __future__ import annotations

import mmap
import os

ALIGN = 4096  # a page: slots suit vector copies and direct I/O to disk
HEADER = 4096  # first page of a shared segment: its token, then blocks


def aligned(size: int) -> int:
    return (size + ALIGN - 1) & ~(ALIGN - 1)


class Extents:
    """Variable-size extents of `capacity` bytes: offsets only, no memory.
    Not thread-safe: its owner locks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = aligned(capacity)
        self._free: dict[int, int] = {0: self.capacity}  # start -> size
        self._free_ends: dict[int, int] = {self.capacity: 0}  # end -> start
        self.used = 0

    def alloc(self, size: int) -> int | None:
        """Offset of a new extent of `size` bytes (best fit), or None if no hole fits."""
        need = aligned(size)
        best = None
        for start, free in self._free.items():
            if free >= need and (best is None or free < self._free[best]):
                best = start
                if free == need:
                    break
        return None if best is None else self._take(best, need)

    def alloc_in(self, hole: tuple[int, int], size: int) -> int | None:
        """Like alloc, but only from `hole` (as returned by `release`)."""
        start, free = hole
        need = aligned(size)
        return self._take(start, need) if free >= need else None

    def release(self, offset: int, size: int) -> tuple[int, int]:
        """Free an extent; return the (start, size) of the coalesced hole it joined."""
        start, end = offset, offset + aligned(size)
        self.used -= end - start
        if end in self._free:  # merge with the hole after
            end += self._free.pop(end)
            del self._free_ends[end]
        if start in self._free_ends:  # merge with the hole before
            start = self._free_ends.pop(start)
            del self._free[start]
        self._free[start] = end - start
        self._free_ends[end] = start
        return start, end - start

    def _take(self, start: int, need: int) -> int:
        free = self._free.pop(start)
        del self._free_ends[start + free]
        if free > need:
            self._free[start + need] = free - need
            self._free_ends[start + free] = start + need
        self.used += need
        return start


class Arena(Extents):
    """Offsets into one preallocated buffer. Not thread-safe: its owner locks.

    Where the OS offers `memfd_create`, the buffer is an anonymous shared-memory
    file: same-host clients can map it (`segment_path`) and read or write slots
    directly. It vanishes with the process, so a crash leaks nothing. Offsets in
    the file are `HEADER` plus arena offsets.
    """

    def __init__(self, capacity: int, *, prefault: bool = True) -> None:
        super().__init__(capacity)
        flags = mmap.MAP_SHARED
        if prefault and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE  # fault pages in now, not during the first puts
        self.segment_fd = -1
        if hasattr(os, "memfd_create"):
            self.segment_fd = os.memfd_create("kvstore-arena")
            os.ftruncate(self.segment_fd, HEADER + self.capacity)
            self._mmap = mmap.mmap(self.segment_fd, HEADER + self.capacity, flags=flags)
        else:
            self._mmap = mmap.mmap(-1, HEADER + self.capacity, flags=flags | mmap.MAP_ANONYMOUS)
        self.header = memoryview(self._mmap)[:HEADER]
        self.memory = memoryview(self._mmap)[HEADER:]

    @property
    def segment_path(self) -> str | None:
        """A path this host's processes of the same user can open to map the arena."""
        return f"/proc/{os.getpid()}/fd/{self.segment_fd}" if self.segment_fd >= 0 else None

    def view(self, offset: int, size: int) -> memoryview:
        return self.memory[offset : offset + size]
