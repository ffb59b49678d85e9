"""The NIXL path's client half: requests go over the node's request channel (TCP), bytes
through NIXL (UCX: RDMA, EFA, CMA on one host, TCP), written into and read from this
process's memory by the node (server/nixl.py).

The client's agent is named by the node, and registers memory once: `register` (host
memory or CUDA tensors) for buffers an engine reuses, which blocks then reach and leave
with no copy here; otherwise a few staging buffers of its own, which cost one copy. While
a request of its own is in flight, the waiting thread makes NIXL progress (the agent runs
no thread of its own: idle, it costs nothing). Small puts go over the socket, as on the
TCP path; a get's small blocks come back on the socket after its answer.
"""

from __future__ import annotations

import bisect
import itertools
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import xxhash

from kvstore.client import gpu_staging, tcp
from kvstore.client.channel import Channels, Link, NodeChanged
from kvstore.client.pipeline import Block, Received, batches, block_slices
from kvstore.client.tcp import Place
from kvstore.client.transport import Arrived, Ask, Out
from kvstore.config import MIN_RATE
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.fabric import Agent, Region, address
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    NIXL_GET,
    NIXL_PUT,
    NIXL_SESSION,
    REQUEST_MAGIC,
    SESSION_ENDED,
    TRUNCATED,
    ChannelError,
    Frame,
    encode,
    recv_exact,
)
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.results import PutResult

SMALL_PUT = 2 << 20  # a put of fewer bytes goes over the socket (the crossover here)
STAGE = 64 << 20  # bytes of a staging buffer, at least
MAX_STAGE = 256 << 20  # a get through staging takes at most this much at once
DATA_TIMEOUT = 30.0  # a node's stall allowance (--data-timeout), where the client set none


class NixlTransport:
    name = "nixl"

    def __init__(self, channels: Channels, host_capacity: int) -> None:
        self.channels = channels
        self._part = min(host_capacity // 4, MAX_STAGE)  # bytes a put reserves at once
        self._lock = threading.Lock()  # the session's connection; registrations
        self._anchor = channels.checkout()  # the session lives as long as this connection
        opened = self._session(pb.NixlSession())
        self.session = opened.session
        self.agent = Agent(opened.agent)  # the name the node gave it
        self._regions: tuple[tuple[Region, object], ...] = ()  # and what keeps each alive
        self._free: list[np.ndarray] = []  # staging buffers not in use
        self._give(self._staging(STAGE))  # the session has memory from the start

    def register(self, *buffers: object) -> None:
        """Register `buffers` (contiguous host memory, or CUDA tensors) with this client's
        agent and tell the node, at once: gets into them and puts from them move no byte
        here. Kept registered (and referenced) for the session's life."""
        with self._lock:
            self._register([(address(buffer), buffer) for buffer in buffers])

    # -- transfers ----------------------------------------------------------------

    def put(
        self, blocks: Sequence[Block], views: Sequence[memoryview], durable: bool = False
    ) -> PutResult:
        sizes = [len(view) for view in views]
        result = PutResult(0, 0)
        for part in batches(sizes, self._part):  # a part's slots are reserved at once
            result += self._put(blocks[part], views[part], durable)
        return result

    def _put(
        self, blocks: Sequence[Block], views: Sequence[memoryview], durable: bool
    ) -> PutResult:
        total = sum(len(v) for v in views)
        if total < SMALL_PUT:
            return tcp.put(self.channels, blocks, views, durable)
        places = [address(v) for v in views]
        held = [self._registered(p) for p in places]
        staging = None
        if any(h is None for h in held):  # what is not registered is copied to staging
            staging = self._staging(total)
            at = 0
            for i, view in enumerate(views):
                if held[i] is None:
                    staging[at : at + len(view)] = np.frombuffer(view, np.uint8)
                    places[i] = Region(address(staging).addr + at, len(view))
                    at += len(view)
        result = self._put_at(blocks, places, durable)
        if staging is not None:  # a failed put's may still be read: it is dropped
            self._give(staging)
        return result

    def put_from(self, blocks: Sequence[Block], sources: Sequence[object]) -> PutResult:
        """`Client.put_from`: the node reads each block where it lies in memory this
        client registered: host memory with no copy here, GPU memory through staging
        (client/gpu_staging.py), where it is hashed."""
        regions = self._places(sources, "sources")
        result = PutResult(0, 0)
        for part in batches([region.size for region in regions], self._part):
            if gpu_staging.is_gpu(sources[part.start]):
                result += self._put_staged(blocks[part], sources[part])
            else:
                result += self._put_at(blocks[part], regions[part], False)
        return result

    def _put_staged(self, blocks: Sequence[Block], tensors: Sequence[object]) -> PutResult:
        staging = self._staging(sum(meta.size for _, meta in blocks))
        arrays = gpu_staging.download(tensors, staging)
        blocks = [
            (key, replace(meta, checksum=xxhash.xxh3_64_intdigest(array.data)))
            for (key, meta), array in zip(blocks, arrays, strict=True)
        ]
        result = self._put_at(blocks, [address(array) for array in arrays], False)
        self._give(staging)  # a failed put's may still be read: it is dropped
        return result

    def _put_at(
        self, blocks: Sequence[Block], places: Sequence[Region], durable: bool
    ) -> PutResult:
        """One request: the node reads each block at its place, in registered memory (all
        host memory, or all one GPU's: the callers see to it)."""
        request = pb.NixlPut(
            headers=pb.BlockHeaders(blocks=headers_to_proto(blocks), durable=durable),
            session=self.session,
            addrs=[p.addr for p in places],
            vram=places[0].vram,
            device=places[0].device,
        )
        nbytes = sum(meta.size for _, meta in blocks)
        reply = pb.PutReply.FromString(self._request(NIXL_PUT, request, nbytes).meta)
        return PutResult(reply.stored, reply.existed)

    def get(self, ask: Ask, out: Out, arrived: Arrived | None) -> Received:
        """Straight into `out` where it is registered memory (one round trip, unless the
        node may wait or fetch first: then two, so that no one spins meanwhile); else
        into staging sized to what the node found, then one copy into place."""
        registered = out is not None and self._registered(address(out)) is not None
        if registered and not ask.wait_ms and not ask.fetch:
            return self._get_span(ask, out)  # type: ignore[arg-type]
        staging: list[np.ndarray] = []

        def place(blocks: list[Block]) -> list[np.ndarray]:
            if registered:
                return _fitting(blocks, out, "out")  # type: ignore[arg-type]
            ends = list(itertools.accumulate(meta.size for _, meta in blocks))
            taken = max(1, bisect.bisect_right(ends, MAX_STAGE))  # the rest: asked again
            staging.append(self._staging(ends[taken - 1]))
            return _fitting(blocks[:taken], staging[0], "staging")

        blocks, _, truncated = self._get_placed(ask, place)
        span, arrays = block_slices([meta for _, meta in blocks], out)
        if staging:
            span[:] = staging[0][: len(span)]  # the one copy
            self._give(staging[0])  # a failed get's may still be written: it is dropped
        return Received(arrays, blocks, truncated)

    def get_into(self, ask: Ask, place: Place, landed: Callable[[int], None]) -> int:
        """`Client.get_into` over NIXL: the node answers the blocks it pinned, `place`
        hands out a registered buffer for each (host or one GPU's memory), and the node
        writes them there; `landed(i)` for each once all are. GPU memory is written
        through staging (client/gpu_staging.py), checked there first."""
        gpu: list = []  # the staging buffer and the GPU places, if places are GPU memory

        def staged(blocks: list[Block]) -> Sequence[object]:
            dests = place(blocks)
            if not any(gpu_staging.is_gpu(dest) for dest in dests):
                return dests
            self._places(dests)  # registered, and all one GPU's
            sizes = [meta.size for _, meta in blocks[: len(dests)]]
            gpu[:] = [self._staging(sum(sizes)), dests]  # the node waits for no transfer now
            return gpu_staging.slices(gpu[0], sizes)

        found, dests, _ = self._get_placed(ask, staged)
        if gpu:
            gpu_staging.upload(dests, found, gpu[1])  # type: ignore[arg-type]
            self._give(gpu[0])  # a failed get's may still be written: it is dropped
        for i in range(len(dests)):
            landed(i)
        return len(dests)

    def _get_span(self, ask: Ask, out: np.ndarray | memoryview) -> Received:
        """One round trip: the present prefix written back to back into `out`, as far as
        it fits."""
        into = address(out)
        request = pb.NixlGet(
            ask=pb.GetRequest(keys=ask.keys, wait_ms=ask.wait_ms, fetch=ask.fetch),
            session=self.session,
            into=pb.NixlRegion(addr=into.addr, size=into.size, vram=into.vram, device=into.device),
        )
        with self._link() as link:
            frame = self.channels.request(
                link, NIXL_GET, request.SerializeToString(), waiting=self._progress(into.size)
            )
            answer = pb.GetAnswer.FromString(frame.meta)
            blocks = headers_from_proto(answer.blocks)
            _, arrays = block_slices([meta for _, meta in blocks], out)
            for i in answer.inline:  # small blocks: on the socket, straight into place
                recv_exact(link.sock, memoryview(arrays[i]))
        return Received(arrays, blocks, bool(frame.flags & TRUNCATED))

    def _get_placed(
        self, ask: Ask, place: Callable[[list[Block]], Sequence[object]]
    ) -> tuple[list[Block], Sequence[object], bool]:
        """Two round trips: the blocks the node pinned, the places `place` gives the first
        of them (registered memory), written there by the node; and whether the node
        stopped short or `place` took fewer."""
        request = pb.NixlGet(
            ask=pb.GetRequest(keys=ask.keys, wait_ms=ask.wait_ms, fetch=ask.fetch),
            session=self.session,
        )
        with self._link() as link:
            frame = self.channels.request(link, NIXL_GET, request.SerializeToString())
            found = headers_from_proto(pb.GetAnswer.FromString(frame.meta).blocks)
            dests = place(found) if found else []
            places = self._places(dests)
            kind = places[0] if places else Region(0, 0)
            taken = pb.NixlPlaces(
                addrs=[p.addr for p in places], vram=kind.vram, device=kind.device
            )
            continued = encode(REQUEST_MAGIC, NIXL_GET, 0, taken.SerializeToString())
            self.channels.send(link, [continued])
            self._progress(sum(p.size for p in places))(link.sock)
            done = self.channels.answer(link)
            answer = pb.GetAnswer.FromString(done.meta)
            for i in answer.inline:  # small blocks: on the socket, straight into place
                recv_exact(link.sock, _bytes_of(dests[i]))
        truncated = bool(frame.flags & TRUNCATED) or len(dests) < len(found)
        return found[: len(dests)], dests, truncated

    def lookup(self, ask: Ask) -> list[str]:
        return tcp.lookup(self.channels, ask)

    def close(self) -> None:
        self.channels.checkin(self._anchor, ok=False)  # the node ends the session
        self.channels.close()

    # -- within -------------------------------------------------------------------

    def _request(self, op: int, message: pb.NixlPut, nbytes: int) -> Frame:
        with self._link() as link:
            return self.channels.request(
                link, op, message.SerializeToString(), waiting=self._progress(nbytes)
            )

    def _progress(self, nbytes: int) -> Callable[[socket.socket], None]:
        """What a request whose `nbytes` move through NIXL does until the node's answer
        arrives (its transfer is done by then): make NIXL progress, only while it is in
        flight, for at most as long as the node may take (its stall allowance and the
        bytes at the floor rate); then reading the answer times out as on any path."""

        def waiting(sock: socket.socket) -> None:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            allowance = self.channels.timeout or DATA_TIMEOUT
            deadline = time.monotonic() + allowance + nbytes / MIN_RATE
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
            while not pending and not poller.poll(0) and time.monotonic() < deadline:
                self.agent.progress()

        return waiting

    def _session(self, message: pb.NixlSession) -> pb.NixlSessionReply:
        """Over the session's own connection (under `_lock`, or before others use it)."""
        try:
            frame = self.channels.request(self._anchor, NIXL_SESSION, message.SerializeToString())
        except ChannelError as exc:  # the session ended with it
            raise NodeChanged(f"{SESSION_ENDED}: {exc}") from None
        return pb.NixlSessionReply.FromString(frame.meta)

    @contextmanager
    def _link(self) -> Iterator[Link]:
        """A pooled connection; a session the node no longer knows (it ended with its own
        connection, or the node restarted) has the client meet the node anew."""
        try:
            with self.channels.link() as link:
                yield link
        except Unavailable as exc:
            if SESSION_ENDED in str(exc) and not isinstance(exc, ChannelError):
                raise NodeChanged(str(exc)) from None
            raise

    def _register(self, added: list[tuple[Region, object]]) -> None:
        """Register with the agent, then tell the node all this session registered; the
        regions are used once the node took them."""
        for region, _ in added:
            self.agent.register(region)
        regions = (*self._regions, *added)
        listed = [
            pb.NixlRegion(addr=r.addr, size=r.size, vram=r.vram, device=r.device)
            for r, _ in regions
        ]
        metadata = self.agent.metadata()
        self._session(pb.NixlSession(session=self.session, metadata=metadata, regions=listed))
        self._regions = regions

    def _places(self, buffers: Sequence[object], what: str = "place") -> list[Region]:
        """Where `buffers` lie: InvalidArgument on `what` unless all in registered memory
        of one kind (host memory, or one GPU's)."""
        places = [address(buffer) for buffer in buffers]
        if any(self._registered(p) is None for p in places):
            raise InvalidArgument(what, "every one must lie in registered memory")
        if len({(p.vram, p.device) for p in places}) > 1:
            raise InvalidArgument(what, "all must be host memory, or all one GPU's")
        return places

    def _registered(self, place: Region) -> Region | None:
        for region, _ in self._regions:
            same_kind = region.vram == place.vram and region.device == place.device
            if same_kind and region.holds(place.addr, place.size):
                return region
        return None

    def _staging(self, size: int) -> np.ndarray:
        """A registered buffer of at least `size` bytes (`_give` it back)."""
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.nbytes >= size:
                    return self._free.pop(i)
            buffer = np.empty(max(size, STAGE), np.uint8)  # pages are touched as used
            self._register([(address(buffer), buffer)])
        return buffer

    def _give(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)


def _fitting(blocks: list[Block], target: np.ndarray | memoryview, what: str) -> list[np.ndarray]:
    """Slices of `target`, back to back, for the leading blocks that fit in it."""
    ends = list(itertools.accumulate(meta.size for _, meta in blocks))
    taken = bisect.bisect_right(ends, np.asarray(target).nbytes)
    if blocks and not taken:
        raise InvalidArgument(what, f"too small for a block of {blocks[0][1].size} bytes")
    return block_slices([meta for _, meta in blocks[:taken]], target)[1]


def _bytes_of(place: object) -> memoryview:
    """A writable byte view of host memory handed out as a place: a buffer, or a CPU
    tensor (which has no buffer protocol of its own)."""
    numpy = getattr(place, "numpy", None)  # a torch tensor; an ndarray has no .numpy
    return memoryview(numpy() if numpy is not None else place).cast("B")  # type: ignore[arg-type]
