"""Same-host transfers through the node's shared host arena.

The client maps the arena once, after proving it shares the host (the segment
holds a random token that only the node's reply names). A Get copies blocks out
of the mapping while the node keeps them pinned, or hands out a `Lease` of
zero-copy views; a Put writes into slots the node reserved, then commits them.
Whatever a client does not finish (it died, or failed half way) expires with
its ticket and is released by the node.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from kvstore.client._wire import block_slices, received, shaped
from kvstore.errors import Unsupported
from kvstore.ingest import PutResult
from kvstore.proto import kvstore_pb2 as pb

Finish = Callable[[bytes], pb.PutReply]
# fill(block indexes, their slots) writes the slots, or starts to and returns a wait
Fill = Callable[[list[int], list[np.ndarray]], Callable[[], None] | None]
_PARALLEL_BYTES = 8 << 20  # below this, threads cost more than they save
_PIECE = 4 << 20


class SharedSegment:
    """The node's host arena, mapped into this process."""

    def __init__(self, info: pb.SegmentInfo) -> None:
        try:
            fd = os.open(info.path, os.O_RDWR)
        except OSError as exc:
            raise Unsupported(f"cannot open the node's shared arena: {exc}") from None
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no faults while copying
            self._mmap = mmap.mmap(fd, 0, flags=flags)
        finally:
            os.close(fd)
        if self._mmap[:16] != info.token:
            self._mmap.close()
            raise Unsupported("the shared arena holds another token: not the node's host")
        self.memory = np.frombuffer(self._mmap, np.uint8)

    def block(self, offset: int, size: int) -> np.ndarray:
        return self.memory[offset : offset + size]


def put(
    segment: SharedSegment,
    ticket: pb.Ticket,
    views: Sequence[memoryview],
    finish: Finish,
    pool: Executor,
) -> PutResult:
    """Write the payloads into the reserved slots, then have the node publish them."""
    present = set(ticket.present)
    wanted = [v for i, v in enumerate(views) if i not in present]
    pairs = [
        (segment.block(offset, len(view)), np.frombuffer(view, np.uint8))
        for view, offset in zip(wanted, ticket.offsets, strict=True)
    ]
    _copy(pairs, pool)  # one copy: caller -> arena
    reply = finish(ticket.id)
    return PutResult(reply.stored, reply.existed)


def slots(
    segment: SharedSegment, ticket: pb.Ticket, indexes: Sequence[int], sizes: Sequence[int]
) -> tuple[list[int], list[np.ndarray]]:
    """The blocks of an in-place put that the node still wants, and their reserved slots."""
    present = set(ticket.present)
    wanted = [i for n, i in enumerate(indexes) if n not in present]
    return wanted, [
        segment.block(offset, sizes[i]) for i, offset in zip(wanted, ticket.offsets, strict=True)
    ]


def get(
    segment: SharedSegment,
    ticket: pb.Ticket,
    out: memoryview | np.ndarray | None,
    verify: bool,
    finish: Finish,
    pool: Executor,
) -> list[tuple[np.ndarray, pb.BlockMeta]]:
    """Copy the pinned blocks out of the mapping, then release them."""
    if not ticket.blocks:
        return []
    _, blocks = block_slices(ticket.blocks, out)
    pairs = [
        (block, segment.block(offset, len(block)))
        for block, offset in zip(blocks, ticket.offsets, strict=True)
    ]
    try:
        _copy(pairs, pool)  # one copy: arena -> destination
    finally:
        finish(ticket.id)
    return received(blocks, ticket.blocks, verify)


def _copy(pairs: list[tuple[np.ndarray, np.ndarray]], pool: Executor) -> None:
    """dest[:] = src for every pair, spread over the pool's threads (copies release the
    GIL, so a many-core host copies at memory bandwidth, not one core's speed)."""
    if sum(src.nbytes for _, src in pairs) < _PARALLEL_BYTES:
        for dest, src in pairs:
            dest[:] = src
        return
    pieces = [
        (d[i : i + _PIECE], s[i : i + _PIECE]) for d, s in pairs for i in range(0, len(s), _PIECE)
    ]
    list(pool.map(lambda pair: np.copyto(*pair), pieces))


class Lease:
    """Zero-copy, read-only views of blocks in the node's arena.

    The node keeps the blocks pinned (not evicted, not reused) until `release()`
    or until `expires_at` (`time.monotonic()`), whichever comes first; after
    that the views must not be read. Use it as a context manager.
    """

    def __init__(self, segment: SharedSegment, ticket: pb.Ticket, finish: Finish) -> None:
        self._ticket_id = ticket.id
        self._finish: Finish | None = finish if ticket.id else None
        self.expires_at = time.monotonic() + ticket.expires_in_s
        self.blocks: list[np.ndarray] = []
        for header, offset in zip(ticket.blocks, ticket.offsets, strict=True):
            view = segment.block(offset, header.meta.size)
            view.flags.writeable = False
            self.blocks.append(shaped(view, header.meta))

    def release(self) -> None:
        """Let the node evict the blocks again; the views are invalid from now on."""
        finish, self._finish = self._finish, None
        if finish is not None:
            finish(self._ticket_id)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
