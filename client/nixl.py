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

import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from kvstore.client import tcp
from kvstore.client.channel import Channels
from kvstore.client.pipeline import Block, Received, batches, block_slices
from kvstore.client.tcp import Place
from kvstore.client.transport import Arrived, Ask, Out
from kvstore.errors import InvalidArgument
from kvstore.fabric import Agent, Region, address
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    NIXL_GET,
    NIXL_PUT,
    NIXL_SESSION,
    REQUEST_MAGIC,
    TRUNCATED,
    Frame,
    encode,
    recv_exact,
)
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.results import PutResult

SMALL_PUT = 256 << 10  # a put of fewer bytes goes over the socket (the crossover)
STAGE = 64 << 20  # bytes of a staging buffer; a get into one asks for at most this much


class NixlTransport:
    name = "nixl"

    def __init__(self, channels: Channels, max_block_size: int, host_capacity: int) -> None:
        self.channels = channels
        self._part = host_capacity // 4  # bytes of a put's slots reserved at once
        self._lock = threading.Lock()  # the session's connection; registrations
        self._anchor = channels.checkout()  # the session lives as long as this connection
        opened = self._session(pb.NixlSession())
        self.session = opened.session
        self.agent = Agent(opened.agent)  # the name the node gave it
        self._stage = max(STAGE, max_block_size)  # any one block fits a staging buffer
        self._regions: tuple[tuple[Region, object], ...] = ()  # and what keeps each alive
        self._free: list[np.ndarray] = []  # staging buffers not in use
        self._give(self._staging(STAGE))  # the session has memory from the start

    def register(self, buffer: object) -> Region:
        """Register `buffer` (contiguous host memory, or a CUDA tensor) with this client's
        agent and tell the node: gets into it and puts from it move no byte here. Kept
        registered (and referenced) for the client's life."""
        region = address(buffer)
        with self._lock:
            self._register(region, buffer)
        return region

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
        kinds = {(p.vram, p.device) for p in places}
        if len(kinds) > 1:
            raise InvalidArgument(
                "payloads", "a put's blocks must all be host memory, or one GPU's"
            )
        vram, device = kinds.pop()
        request = pb.NixlPut(
            headers=pb.BlockHeaders(blocks=headers_to_proto(blocks), durable=durable),
            session=self.session,
            addrs=[p.addr for p in places],
            vram=vram,
            device=device,
        )
        try:
            reply = pb.PutReply.FromString(self._request(NIXL_PUT, request).meta)
        finally:
            if staging is not None:
                self._give(staging)
        return PutResult(reply.stored, reply.existed)

    def get(self, ask: Ask, out: Out, arrived: Arrived | None) -> Received:
        """Into `out` where it is registered; else through staging, one copy."""
        staging = None
        into = address(out) if out is not None else None
        if into is None or self._registered(into) is None:
            size = into.size if into is not None else self._stage
            staging = self._staging(size)
            into = Region(address(staging).addr, min(size, staging.nbytes))
        request = pb.NixlGet(
            ask=pb.GetRequest(keys=ask.keys, wait_ms=ask.wait_ms, fetch=ask.fetch),
            session=self.session,
            into=pb.NixlRegion(addr=into.addr, size=into.size, vram=into.vram, device=into.device),
        )
        try:
            with self.channels.link() as link:
                frame = self.channels.request(
                    link, NIXL_GET, request.SerializeToString(), waiting=self._progress
                )
                answer = pb.GetAnswer.FromString(frame.meta)
                blocks = headers_from_proto(answer.blocks)
                _, arrays = block_slices([meta for _, meta in blocks], out)
                for i in answer.inline:  # small blocks: on the socket, straight into place
                    recv_exact(link.sock, memoryview(arrays[i]))
            if staging is not None:
                inline, at = set(answer.inline), 0
                for i, array in enumerate(arrays):
                    if i not in inline:
                        array[:] = staging[at : at + array.nbytes]
                    at += array.nbytes
        finally:
            if staging is not None:
                self._give(staging)
        return Received(arrays, blocks, bool(frame.flags & TRUNCATED))

    def get_into(self, ask: Ask, place: Place, landed: Callable[[int], None]) -> int:
        """`Client.get_into` over NIXL: the node answers the blocks it pinned, `place`
        hands out a registered buffer for each (host or one GPU's memory), and the node
        writes them there; `landed(i)` for each once all are."""
        request = pb.NixlGet(
            ask=pb.GetRequest(keys=ask.keys, wait_ms=ask.wait_ms, fetch=ask.fetch),
            session=self.session,
        )
        with self.channels.link() as link:
            frame = self.channels.request(link, NIXL_GET, request.SerializeToString())
            blocks = headers_from_proto(pb.GetAnswer.FromString(frame.meta).blocks)
            dests = place(blocks) if blocks else []
            places = [address(dest) for dest in dests]
            if any(self._registered(p) is None for p in places):
                raise InvalidArgument("place", "every place must be registered memory")
            kinds = {(p.vram, p.device) for p in places} or {(False, 0)}
            if len(kinds) > 1:
                raise InvalidArgument("place", "places must all be host memory, or one GPU's")
            vram, device = kinds.pop()
            taken = pb.NixlPlaces(addrs=[p.addr for p in places], vram=vram, device=device)
            self.channels.send(
                link, [encode(REQUEST_MAGIC, NIXL_GET, 0, taken.SerializeToString())]
            )
            self._progress(link.sock)
            answer = pb.GetAnswer.FromString(self.channels.answer(link).meta)
            for i in answer.inline:  # small blocks: on the socket, straight into place
                recv_exact(link.sock, memoryview(dests[i]).cast("B"))
        for i in range(len(dests)):
            landed(i)
        return len(dests)

    def lookup(self, ask: Ask) -> list[str]:
        return tcp.lookup(self.channels, ask)

    def close(self) -> None:
        self.channels.checkin(self._anchor, ok=False)  # the node ends the session
        self.channels.close()

    # -- within -------------------------------------------------------------------

    def _request(self, op: int, message: pb.NixlPut | pb.NixlGet) -> Frame:
        with self.channels.link() as link:
            return self.channels.request(
                link, op, message.SerializeToString(), waiting=self._progress
            )

    def _progress(self, sock: socket.socket) -> None:
        """Make NIXL progress until the node's answer arrives (the node's transfer is done
        by then): only while a request of ours is in flight."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        timeout = self.channels.timeout
        deadline = time.monotonic() + timeout if timeout else math.inf
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        while not pending and not poller.poll(0):
            self.agent.progress()
            if time.monotonic() > deadline:
                return  # reading the answer times out as on any path

    def _session(self, message: pb.NixlSession) -> pb.NixlSessionReply:
        """Over the session's own connection (under `_lock`, or before others use it)."""
        frame = self.channels.request(self._anchor, NIXL_SESSION, message.SerializeToString())
        return pb.NixlSessionReply.FromString(frame.meta)

    def _register(self, region: Region, keep: object) -> None:
        """Register with the agent, then tell the node all this session registered."""
        self.agent.register(region)
        self._regions = (*self._regions, (region, keep))
        regions = [
            pb.NixlRegion(addr=r.addr, size=r.size, vram=r.vram, device=r.device)
            for r, _ in self._regions
        ]
        metadata = self.agent.metadata()
        self._session(pb.NixlSession(session=self.session, metadata=metadata, regions=regions))

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
            self._register(address(buffer), buffer)
        return buffer

    def _give(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)
