"""The shared-memory path, for a client on the node's host: requests go over the node's
Unix socket, bytes through its arena, which the node hands over as a memory descriptor
(never a path) and the client maps once.

A get answers where the blocks lie; the client copies them out (or holds a `Lease` of
zero-copy views) and owes a release, which rides with its next request. A put reserves
slots, the client writes them, then commits; small puts go inline over the socket, one
round trip. What a client leaves unfinished ends when its connection closes or, if it
hangs, when the lease expires unrenewed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from kvstore.client import tcp
from kvstore.client.channel import Channels, Link
from kvstore.client.pipeline import Block, Received, batches, block_slices, shaped
from kvstore.client.transport import Arrived, Ask, Out
from kvstore.errors import LeaseExpired
from kvstore.meta import check_stored
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import COMMIT, GET, PUT, SHM, TRUNCATED
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.results import PutResult

# fill(block indexes, their slots) writes the slots, or starts to and returns a wait
Fill = Callable[[list[int], list[np.ndarray]], Callable[[], None] | None]
_PARALLEL_BYTES = 8 << 20  # below this, threads cost more than they save
INLINE_PUT = 64 << 10  # larger puts write the arena: a Unix socket moves 200 KiB per wakeup
_PIECE = 4 << 20


class ShmTransport:
    name = "shm"

    def __init__(self, channels: Channels, verify: bool, pool: Executor) -> None:
        """`verify`: leases check their blocks' checksums when taken."""
        assert channels.arena is not None
        self.channels = channels
        self.arena = channels.arena
        self.verify = verify
        self._pool = pool

    def put(
        self, blocks: Sequence[Block], views: Sequence[memoryview], durable: bool = False
    ) -> PutResult:
        sizes = [len(view) for view in views]
        result = PutResult(0, 0)
        for part in batches(sizes, len(self.arena) // 4):  # slots are held at once
            if sum(sizes[part]) <= INLINE_PUT:  # small: through the socket, one round trip
                result += tcp.put(self.channels, blocks[part], views[part], durable)
                continue
            with self.channels.link() as link:
                answer, slots = self._reserve(link, blocks[part], durable)
                wanted = [v for i, v in enumerate(views[part]) if i not in set(answer.present)]
                _copy(list(zip(slots, (np.frombuffer(v, np.uint8) for v in wanted), strict=True)),
                      self._pool)  # fmt: skip
                result += self._commit(link, answer.put)
        return result

    def put_in_place(
        self, blocks: Sequence[Block], first: int, fill: Fill, checksum: bool
    ) -> Callable[[], PutResult]:
        """Reserve slots for `blocks` (block indexes from `first`) and have `fill` write
        them (or start to); returns the commit to call once fill's copies may be done."""
        link = self.channels.checkout()  # the reservation is this connection's
        try:
            answer, slots = self._reserve(link, blocks)
            present = set(answer.present)
            wanted = [first + i for i in range(len(blocks)) if i not in present]
            wait = fill(wanted, slots) if wanted else None
        except BaseException:
            self.channels.checkin(link, ok=False)  # the node frees the slots
            raise

        def commit() -> PutResult:
            try:
                if wait is not None:
                    wait()
                result = self._commit(link, answer.put, hash_here=checksum)
            except BaseException:
                self.channels.checkin(link, ok=False)
                raise
            self.channels.checkin(link)
            return result

        return commit

    def get(self, ask: Ask, out: Out, arrived: Arrived | None) -> Received:
        with self.channels.link() as link:
            answer, truncated = self._pin(link, ask)
            blocks = headers_from_proto(answer.blocks)
            _, arrays = block_slices([meta for _, meta in blocks], out)
            pairs = [
                (dest, self.arena[offset : offset + dest.nbytes])
                for dest, offset in zip(arrays, answer.offsets, strict=True)
            ]
            try:
                _copy(pairs, self._pool)  # one copy: arena -> destination
            finally:
                if answer.lease:
                    self.channels.owe_release(link, answer.lease)  # rides with the next one
        return Received(arrays, blocks, truncated)

    def lease(self, ask: Ask) -> Lease:
        with self.channels.link() as link:
            answer, truncated = self._pin(link, ask)
        lease = Lease(self, link, answer, truncated)
        if answer.lease:
            self.channels._keeper.track(lease)
        return lease

    def lookup(self, ask: Ask) -> list[str]:
        return tcp.lookup(self.channels, ask)

    def close(self) -> None:
        self.channels.close()

    def _pin(self, link: Link, ask: Ask) -> tuple[pb.GetAnswer, bool]:
        frame = self.channels.request(link, GET, ask.message(), flags=SHM)
        return pb.GetAnswer.FromString(frame.meta), bool(frame.flags & TRUNCATED)

    def _reserve(
        self, link: Link, blocks: Sequence[Block], durable: bool = False
    ) -> tuple[pb.PutAnswer, list]:
        headers = pb.BlockHeaders(blocks=headers_to_proto(blocks), durable=durable)
        meta = headers.SerializeToString()
        answer = pb.PutAnswer.FromString(self.channels.request(link, PUT, meta, flags=SHM).meta)
        present = set(answer.present)
        sizes = [m.size for i, (_, m) in enumerate(blocks) if i not in present]
        slots = [
            self.arena[offset : offset + size]
            for offset, size in zip(answer.offsets, sizes, strict=True)
        ]
        return answer, slots

    def _commit(self, link: Link, put: int, hash_here: bool = False) -> PutResult:
        """`hash_here`: the node computes the blocks' checksums from their slots."""
        if not put:
            return PutResult(0, 0)
        meta = pb.Commit(put=put, hash_here=hash_here).SerializeToString()
        reply = pb.PutReply.FromString(self.channels.request(link, COMMIT, meta).meta)
        return PutResult(reply.stored, reply.existed)


class Lease:
    """Zero-copy, read-only views of blocks in the node's arena, pinned there (not evicted,
    not reused) until `release()`. While this process lives, the lease is renewed for it;
    if it ends otherwise (the node restarted, the process was stopped past its expiry),
    reading `blocks` raises `LeaseExpired` instead of showing bytes that may be another
    block's by now. Arrays taken out of `blocks` must not be used after the lease ends.
    Use it as a context manager (`with` or `async with`)."""

    def __init__(
        self, transport: ShmTransport, link: Link, answer: pb.GetAnswer, truncated: bool
    ) -> None:
        self._transport = transport
        self.link = link
        self.id = answer.lease
        self.truncated = truncated  # see Received.truncated
        self._ttl = answer.expires_in_s
        self.renewed(time.monotonic())
        self._released = not self.id
        arena = transport.arena
        self._blocks: list[np.ndarray] = []
        blocks = headers_from_proto(answer.blocks)
        for (key, meta), offset in zip(blocks, answer.offsets, strict=True):
            view = arena[offset : offset + meta.size]
            view.flags.writeable = False
            if transport.verify:
                check_stored(view.data, key, meta)
            self._blocks.append(shaped(view, meta))

    @property
    def blocks(self) -> list[np.ndarray]:
        if self._released and self.id:
            raise LeaseExpired("the lease was released: its blocks may be another's now")
        if self.link.broken or time.monotonic() >= self.expires_at:
            raise LeaseExpired("the lease expired: its blocks may be another's now")
        return self._blocks

    @property
    def active(self) -> bool:
        return not self._released and not self.link.broken

    def due(self, now: float) -> bool:
        return self.active and self.renew_at <= now

    def renewed(self, now: float) -> int:
        """The keeper renews it now (conservatively: expiry counts from the request)."""
        self.expires_at = now + self._ttl
        self.renew_at = now + self._ttl / 3
        return self.id

    def release(self) -> None:
        """Let the node evict the blocks again; the views are invalid from now on."""
        if not self._released:
            self._released = True
            if not self.link.broken:
                self._transport.channels.owe_release(self.link, self.id)

    def __len__(self) -> int:
        return len(self._blocks)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            self.release()


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
