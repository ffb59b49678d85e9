"""The NIXL path's node half, over the request channel: the node keeps control. A client
registers its own memory with an agent the node names, and sends that agent's metadata
over its authenticated connection; the node never gives out its own (whoever holds an
agent's metadata may read and write all it registered). A get names a region of the
client's memory: the node pins the blocks, WRITEs them there and answers. A put names
where its blocks lie: the node reserves slots, READs them in, verifies their checksums
and publishes them. Both go through the request policy, as on every path.

Small blocks of a get (under `INLINE_BELOW`) follow the answer on the socket, where they
cost less than a NIXL transfer (DATAPLANE.md, "NIXL"). A session ends, and its agent is
removed, when the connection that opened it closes: a client that died leaves nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kvstore.errors import InvalidArgument, ResourceExhausted, Unavailable
from kvstore.fabric import Agent, Region, address
from kvstore.meta import check_stored
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    NIXL_GET,
    READY,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SESSION_ENDED,
    TRUNCATED,
    ChannelError,
    Frame,
    encode,
    read_frame,
    send_views,
)
from kvstore.proto.convert import headers_from_proto, headers_to_proto
from kvstore.proto.frames import parse
from kvstore.server.policy import Caller, Reading

if TYPE_CHECKING:
    from kvstore.server.channel import ChannelServer, Connection
    from kvstore.store import Store

log = logging.getLogger("kvstore.nixl")
INLINE_BELOW = 1 << 20  # a get's blocks under this go on the socket (the crossover here)
MAX_SESSIONS = 256  # NIXL sessions (client agents) per tenant; past it, clients take TCP
MAX_REGIONS = 1024  # registered regions per session


@dataclass(eq=False)
class Session:
    """One client agent: its node-given name and the memory it registered. It lives as long
    as the connection that opened it (which the client keeps for that alone); any of the
    tenant's connections may use it. Transfers share it; a new registration waits for
    them to end."""

    id: int
    tenant: str
    agent: str
    peer: str = ""  # the agent's name once its metadata is added
    regions: list[Region] = field(default_factory=list)
    moving: int = 0
    ended: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def region(self, addr: int, size: int, vram: bool, device: int, what: str) -> Region:
        """The registered region holding [addr, addr + size); InvalidArgument if none."""
        for region in self.regions:
            if region.vram == vram and region.device == device and region.holds(addr, size):
                return region
        raise InvalidArgument(
            what, f"{size} bytes at {addr:#x} are not within memory this session registered"
        )

    @contextmanager
    def using(self) -> Iterator[None]:
        with self.changed:
            if self.ended:
                raise Unavailable(f"{SESSION_ENDED}: open another")
            if not self.peer:
                raise InvalidArgument("session", "no memory registered yet")
            self.moving += 1
        try:
            yield
        finally:
            with self.changed:
                self.moving -= 1
                self.changed.notify_all()


class NixlNode:
    """The node's agent, its arena registered once, and the sessions of its clients."""

    def __init__(self, store: Store, name: str) -> None:
        self.agent = Agent(name)
        memory = store.host.arena.memory
        self.arena = address(memory)
        self.agent.register(self.arena)
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()  # sessions, and adding or removing peers

    # -- sessions ---------------------------------------------------------------

    def open(self, conn: Connection, request: pb.NixlSession) -> pb.NixlSessionReply:
        """A new session (its agent named here), or a session's registered memory, anew."""
        if not request.session:
            with self._lock:
                mine = sum(s.tenant == conn.tenant.name for s in self._sessions.values())
                if mine >= MAX_SESSIONS:
                    raise ResourceExhausted(
                        f"tenant {conn.tenant.name!r} has {MAX_SESSIONS} NIXL sessions open"
                    )
                session_id = int.from_bytes(os.urandom(8), "big") or 1
                name = f"kvstore-client-{session_id:016x}"
                self._sessions[session_id] = Session(session_id, conn.tenant.name, name)
            conn.nixl.add(session_id)  # it ends with this connection
            return pb.NixlSessionReply(session=session_id, agent=name)
        session = self.session(conn, request.session)
        regions = [_region(r) for r in request.regions]
        if not regions or len(regions) > MAX_REGIONS:
            raise InvalidArgument("regions", f"{len(regions)} regions: 1..{MAX_REGIONS}")
        with session.changed:
            while session.moving:
                session.changed.wait()
            if session.ended:  # its connection closed meanwhile
                raise Unavailable(f"{SESSION_ENDED}: open another")
            with self._lock:
                if session.peer:
                    self.agent.remove_peer(session.peer)
                    session.peer = ""
                try:
                    named = self.agent.add_peer(request.metadata)
                except Exception as exc:  # NIXL's own parse of the client's bytes
                    raise InvalidArgument(
                        "metadata", f"not a NIXL agent's metadata: {exc}"
                    ) from None
                if named != session.agent:
                    with contextlib.suppress(Exception):  # it named one NIXL will not drop
                        self.agent.remove_peer(named)
                    raise InvalidArgument(
                        "metadata",
                        f"describes agent {named!r}; this session's is {session.agent!r}",
                    )
                session.peer = named
                session.regions = regions
        return pb.NixlSessionReply(session=session.id, agent=session.agent)

    def session(self, conn: Connection, session_id: int) -> Session:
        """The caller's session `session_id`."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.tenant != conn.tenant.name:
            raise Unavailable(f"{SESSION_ENDED}: open another")
        return session

    def closed(self, conn: Connection) -> None:
        """A connection ended, and with it the sessions it opened, once their transfers
        in flight are done."""
        for session_id in conn.nixl:
            with self._lock:
                session = self._sessions.pop(session_id, None)
            if session is not None:
                with session.changed:
                    while session.moving:
                        session.changed.wait()
                    self.end(session)
        conn.nixl.clear()

    def move(
        self,
        session: Session,
        op: str,
        local: list[tuple[int, int]],
        remote: list[tuple[int, int]],
        kind: Region,
        deadline: float,
    ) -> None:
        """A session's WRITE or READ (`Agent.move`); if it fails or passes its deadline,
        the session ends before the caller frees the pins or slots involved."""
        try:
            self.agent.move(op, local, remote, kind, session.peer, deadline)
        except BaseException:
            self.end(session)
            raise

    def end(self, session: Session) -> None:
        """End `session` now: its agent removed (a transfer of it still under way, past a
        deadline or failed, is cut off with it), so it reaches none of this node's memory
        again, before what it held is freed."""
        with self._lock:
            self._sessions.pop(session.id, None)
            session.ended = True
            try:
                if session.peer:
                    self.agent.remove_peer(session.peer)
                self.agent.progress()  # UCX closes the peer's sockets as it makes progress
            except Exception:  # never a reason to keep serving the connection less well
                log.exception("NIXL agent %s could not be removed", session.peer)
            session.peer = ""


def _region(message: pb.NixlRegion) -> Region:
    if not message.size or message.addr + message.size >= 1 << 64:
        raise InvalidArgument("regions", f"{message.size} bytes at {message.addr:#x}")
    return Region(message.addr, message.size, message.vram, message.device)


def _caller(conn: Connection) -> Caller:
    return replace(conn.caller(), path="nixl")  # its transfers are counted as NIXL's


def _nixl(server: ChannelServer) -> NixlNode:
    if server.nixl is None:
        raise InvalidArgument("op", "this node serves no NIXL (--nixl off, or not installed)")
    return server.nixl


# -- operations on the request channel ---------------------------------------------


def session(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    request = parse(frame.meta, pb.NixlSession)
    reply = _nixl(server).open(conn, request)
    server.reply(conn, reply.SerializeToString())


def get(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    """The present prefix, into the region the request names (back to back, as far as it
    fits), or (no region) into the places the client names once it knows the blocks."""
    nixl = _nixl(server)
    request = parse(frame.meta, pb.NixlGet)
    session = nixl.session(conn, request.session)
    with server.policy.get(_caller(conn), server.ask(request.ask)) as found:
        sizes = [len(view) for view in found.views]
        if request.HasField("into"):
            into = request.into
            starts = itertools.accumulate([into.addr, *sizes[:-1]])
            end = into.addr + into.size
            places = [at for at, size in zip(starts, sizes, strict=True) if at + size <= end]
            if sizes and not places:
                raise InvalidArgument(
                    "into", f"{into.size} bytes: too small for a block of {sizes[0]}"
                )
            kind = Region(0, 0, into.vram, into.device)
            spans = [(into.addr, into.size, "into")]
        else:  # the client may register memory for them meanwhile: no transfer held yet
            taken = _places(server, conn, found)
            places, kind = list(taken.addrs), Region(0, 0, taken.vram, taken.device)
            spans = [
                (at, size, f"addrs[{i}]")
                for i, (at, size) in enumerate(zip(places, sizes, strict=False))
            ]
        with session.using():  # its regions stay as they are until this is written
            for at, size, what in spans:
                session.region(at, size, kind.vram, kind.device, what)
            truncated = found.truncated or len(places) < len(sizes)
            _write(server, conn, nixl, session, found, places, kind, truncated)


def _places(server: ChannelServer, conn: Connection, found: Reading) -> pb.NixlPlaces:
    """Answer the pinned blocks (READY), then read where the client wants those it takes."""
    flags = READY | (TRUNCATED if found.truncated else 0)
    server.reply(conn, pb.GetAnswer(blocks=headers_to_proto(found.headers)).SerializeToString(),
                 flags=flags)  # fmt: skip
    taken = read_frame(conn.sock, REQUEST_MAGIC)
    if taken.kind != NIXL_GET:
        raise ChannelError(f"expected the places of a NIXL get, got operation {taken.kind}")
    places = parse(taken.meta, pb.NixlPlaces)
    if len(places.addrs) > len(found.blocks):
        raise InvalidArgument("addrs", f"{len(places.addrs)} places for {len(found.blocks)} blocks")
    return places


def _write(
    server: ChannelServer,
    conn: Connection,
    nixl: NixlNode,
    session: Session,
    found: Reading,
    places: list[int],
    kind: Region,
    truncated: bool,
) -> None:
    """WRITE the first `len(places)` blocks to their places, then answer; small blocks
    follow the answer on the socket instead. Blocks for a GPU are checked here, all before
    any leaves (host memory is checked by the client, on arrival)."""
    views, headers = found.views[: len(places)], found.headers[: len(places)]
    if kind.vram:
        for (key, meta), view in zip(headers, views, strict=True):
            check_stored(view, key, meta)
    inline, local, remote = [], [], []
    for i, (view, place) in enumerate(zip(views, places, strict=True)):
        if kind.vram or len(view) >= INLINE_BELOW:  # pinned views lie in the arena
            local.append((address(view).addr, len(view)))
            remote.append((place, len(view)))
        else:
            inline.append(i)  # small: cheaper on the socket
    nbytes = sum(map(len, views))
    if local:
        nixl.move(session, "WRITE", local, remote, kind, server.deadline(nbytes))
    answer = pb.GetAnswer(blocks=headers_to_proto(headers), truncated=truncated, inline=inline)
    sent = [views[i] for i in inline]
    head = encode(REPLY_MAGIC, 0, TRUNCATED if truncated else 0, answer.SerializeToString(),
                  sum(map(len, sent)))  # fmt: skip
    send_views(conn.sock, [head, *sent], server.deadline(nbytes))


def put(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    """Slots reserved (maybe after a wait for room), the client's bytes READ into them,
    checked, published."""
    nixl = _nixl(server)
    request = parse(frame.meta, pb.NixlPut)
    session = nixl.session(conn, request.session)
    blocks = headers_from_proto(request.headers.blocks)
    if len(request.addrs) != len(blocks):
        raise InvalidArgument("addrs", f"{len(request.addrs)} for {len(blocks)} blocks")
    caller = _caller(conn)
    slots = server.policy.reserve(caller, blocks, request.headers.durable)
    try:
        with session.using():  # its regions stay as they are until this is read
            for i, (addr, (_, meta)) in enumerate(zip(request.addrs, blocks, strict=True)):
                session.region(addr, meta.size, request.vram, request.device, f"addrs[{i}]")
            present = set(slots.present)
            wanted = [i for i in range(len(blocks)) if i not in present]
            targets = [(address(r.view).addr, r.size) for r in slots.reservations]
            if wanted:
                remote = [(request.addrs[i], blocks[i][1].size) for i in wanted]
                kind = Region(0, 0, request.vram, request.device)  # every region's (checked)
                nixl.move(session, "READ", targets, remote, kind, server.deadline(slots.nbytes))
        # blocks from GPU memory come with no checksum (the client cannot hash them
        # cheaply): they get theirs here, from the bytes as they arrived, so later reads
        # are checked; their way here is not
        result = server.policy.commit(caller, slots, (), unhashed=request.vram)
    except BaseException:
        slots.end()
        raise
    reply = pb.PutReply(stored=result.stored, existed=result.existed).SerializeToString()
    server.reply(conn, reply)
