"""The request channel's listener (proto/DATAPLANE.md): TCP connections, and an abstract
Unix socket for clients on this host, that carry block operations themselves, one round
trip each, with no gRPC call on the way.

A bounded pool of threads serves every connection through one epoll set, so an idle
connection costs a file descriptor, not a thread: each thread waits in epoll for one
ready connection (one-shot, so no two threads serve one connection at once), serves its
request and re-arms the connection. Connections are bounded in total and per host. A transfer
has a deadline (`timeout` plus its bytes at `min_rate`) however its bytes trickle in;
past it the connection is dropped and whatever it reserved or pinned is freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.errors import (
    Busy,
    InvalidArgument,
    KVStoreError,
    PermissionDenied,
    ResourceExhausted,
)
from kvstore.ingest import SlotPut
from kvstore.keys import check_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    BUSY,
    COMMIT,
    GET,
    HELLO,
    HELLO_MAGIC,
    HELLO_REPLY,
    LOOKUP,
    NO_REPLY,
    PUT,
    RELEASE,
    RENEW,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SHM,
    VERSION,
    ChannelError,
    Frame,
    encode,
    read_frame,
    recv_exact,
    stall_timeout,
)
from kvstore.proto.frames import FrameError, parse
from kvstore.server import shm, tcp
from kvstore.server.auth import Auth
from kvstore.server.fetch import Fetcher
from kvstore.server.status import TransferCounts, status_of
from kvstore.server.tickets import TicketBook
from kvstore.store import ReadBatch, Store
from kvstore.tenants import OPEN, Tenant

log = logging.getLogger("kvstore.dataplane")
IDLE_TIMEOUT = 600.0  # a pooled connection may wait this long for its next request
CONTINUE = object()  # a request answered by nothing: the one behind it may be waiting
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(eq=False)
class Held:
    """What a connection holds between requests: a lease's pins or a put's slots."""

    what: ReadBatch | SlotPut
    expires: float

    def end(self) -> None:
        if isinstance(self.what, ReadBatch):
            self.what.close()
        else:
            self.what.abort()


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    kind: str  # "tcp" or "unix"
    host: str  # the peer's address; "local" over the Unix socket
    open: bool = False  # HELLO done
    tenant: Tenant = OPEN  # whose ticket opened it
    last_used: float = field(default_factory=time.monotonic)
    held: dict[int, Held] = field(default_factory=dict)  # lease or put id -> what it holds
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hold(self, what: ReadBatch | SlotPut, ttl: float) -> int:
        hold_id = int.from_bytes(os.urandom(8), "big") or 1
        with self.lock:
            self.held[hold_id] = Held(what, time.monotonic() + ttl)
        return hold_id

    def take(self, hold_id: int) -> Held | None:
        with self.lock:
            return self.held.pop(hold_id, None)

    def release_all(self) -> None:
        with self.lock:
            held, self.held = list(self.held.values()), {}
        for h in held:
            h.end()


class ChannelServer:
    def __init__(
        self,
        store: Store,
        tickets: TicketBook,
        transfers: TransferCounts,
        auth: Auth,
        *,
        instance: bytes,
        tcp_address: str | None,
        unix: bool,
        timeout: float,
        min_rate: float,
        lease_ttl: float,
        workers: int = 16,
        max_connections: int = 1024,
        max_per_host: int = 256,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls  # TCP connections speak TLS (the Unix socket never leaves the host)
        self.store = store
        self.tickets = tickets
        self.transfers = transfers
        self.auth = auth
        self.instance = instance
        self.timeout = timeout
        self.min_rate = min_rate
        self.lease_ttl = lease_ttl
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self.fetcher: Fetcher | None = None  # set by the daemon: fetch-through and waits
        self._poll = select.epoll()
        self._listeners: dict[int, tuple[socket.socket, str]] = {}
        self._connections: dict[int, Connection] = {}
        self._per_host: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.address = ""
        self.unix_address = ""
        if tcp_address is not None:
            host, _, port = tcp_address.rpartition(":")
            listener = socket.create_server((host.strip("[]"), int(port)), backlog=512)
            self.address = f"{host}:{listener.getsockname()[1]}"
            self._listen(listener, "tcp")
        if unix and store.host.arena.segment_fd >= 0:
            name = f"\0kvstore-{instance.hex()}"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(name)
            listener.listen(512)
            self.unix_address = name[1:]  # abstract: no file, gone with the process
            self._listen(listener, "unix")
        self._threads = [
            threading.Thread(target=self._work, name=f"kvstore-data-{i}", daemon=True)
            for i in range(workers)
        ]
        self._sweeper = threading.Thread(target=self._sweep, name="kvstore-sweep", daemon=True)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> ChannelServer:
        for thread in (*self._threads, self._sweeper):
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for listener, _ in list(self._listeners.values()):
            listener.close()
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its peer
                conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        for conn in connections:
            conn.release_all()
        self._poll.close()

    def revoke(self, still: Callable[[Tenant], bool]) -> None:
        """End the connections of callers no longer allowed (an auth reload); what they
        held (leases, reserved slots) is freed as they close."""
        with self._lock:
            ended = [c for c in self._connections.values() if not still(c.tenant)]
        for conn in ended:
            log.info("data connection from %s ended: its tenant was removed or changed", conn.host)
            with contextlib.suppress(OSError):  # wakes whoever serves it: it closes
                conn.sock.shutdown(socket.SHUT_RDWR)

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def deadline(self, nbytes: int) -> float:
        """When a transfer of `nbytes` must be done: a stall allowance plus a floor rate."""
        return time.monotonic() + self.timeout + nbytes / self.min_rate

    # -- the loop ---------------------------------------------------------------

    def _listen(self, listener: socket.socket, kind: str) -> None:
        listener.setblocking(False)
        self._listeners[listener.fileno()] = (listener, kind)
        self._poll.register(listener.fileno(), select.EPOLLIN | select.EPOLLONESHOT)

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                events = self._poll.poll(1.0, 1)
            except (OSError, ValueError):  # closed at stop
                return
            for fd, _ in events:
                if fd in self._listeners:
                    self._accept(*self._listeners[fd])
                elif (conn := self._connections.get(fd)) is not None:
                    self._serve(conn)

    def _accept(self, listener: socket.socket, kind: str) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # closed at stop, or out of file descriptors: try again later
                break
            host = "local" if kind == "unix" else _same_host(peer[0])
            stall_timeout(sock, self.timeout)
            if kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            refusal = self._admit(host)
            if refusal:
                _refuse(sock, ResourceExhausted(refusal))
                continue
            conn = Connection(sock, kind, host)
            with self._lock:
                self._connections[sock.fileno()] = conn
            self._poll.register(sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
        if not self._stopping.is_set():
            self._poll.modify(listener.fileno(), select.EPOLLIN | select.EPOLLONESHOT)

    def _admit(self, host: str) -> str:
        with self._lock:
            if len(self._connections) >= self.max_connections:
                return f"the node serves {self.max_connections} data connections already"
            if self._per_host[host] >= self.max_per_host:
                return f"{host} has {self.max_per_host} data connections open already"
            self._per_host[host] += 1
        return ""

    def _serve(self, conn: Connection) -> None:
        """Serve what a ready connection sent (requests sent together, in turn), then wait
        for it again; close it on a protocol error, a broken socket or a missed deadline."""
        try:
            keep = self._hello(conn) if not conn.open else self._request(conn)
            # a release or renewal: the request behind it is here; and TLS may hold the next
            # request decrypted already, where epoll cannot see it
            while keep is CONTINUE or (keep and _tls_pending(conn.sock)):
                if not _buffered(conn.sock):
                    keep = True
                    break
                keep = self._request(conn)
        except (ChannelError, ConnectionError, TimeoutError, OSError) as exc:
            log.info("data connection from %s ended: %s", conn.host, exc)
            keep = False
        except Exception:
            log.exception("data connection from %s: internal error", conn.host)
            keep = False
        if keep:
            conn.last_used = time.monotonic()
            try:
                self._poll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
                return
            except (OSError, ValueError):  # closed meanwhile
                pass
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        with self._lock:
            if self._connections.pop(conn.sock.fileno(), None) is None:
                return
            self._per_host[conn.host] -= 1
            if not self._per_host[conn.host]:
                del self._per_host[conn.host]
        with contextlib.suppress(OSError, ValueError):  # the socket failed: epoll dropped it
            self._poll.unregister(conn.sock.fileno())
        conn.sock.close()
        conn.release_all()  # pins and slots of a client gone: free at once

    # -- opening ----------------------------------------------------------------

    def _hello(self, conn: Connection) -> bool:
        if self.tls is not None and conn.kind == "tcp":
            conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)  # the handshake
        head = memoryview(bytearray(HELLO.size))
        recv_exact(conn.sock, head[:1])  # an empty read here is a client that left
        recv_exact(conn.sock, head[1:])
        magic, version, ticket, proof = HELLO.unpack(head)
        try:
            if magic != HELLO_MAGIC:
                raise InvalidArgument("hello", "not a kvstore channel (expected KVC1)")
            if version != VERSION:
                raise InvalidArgument("hello", f"channel version {version}; this node: {VERSION}")
            if conn.kind == "unix":
                _check_same_user(conn.sock)
            tenant = self.tickets.redeem(ticket, None if conn.kind == "unix" else conn.host, proof)
            if conn.kind == "unix" and not tenant.shm:
                raise PermissionDenied(f"tenant {tenant.name!r} may not map this node's memory")
        except KVStoreError as exc:
            _refuse(conn.sock, exc)
            return False
        arena = self.store.host.arena
        size = len(arena.header) + len(arena.memory) if conn.kind == "unix" else 0
        reply = HELLO_REPLY.pack(HELLO_MAGIC, 0, 0, self.instance, size)
        if conn.kind == "unix":  # the arena's memfd itself: the client opens no path
            socket.send_fds(conn.sock, [reply], [arena.segment_fd])
        else:
            conn.sock.sendall(reply)
        conn.tenant = tenant
        conn.open = True
        return True

    # -- requests ---------------------------------------------------------------

    def _request(self, conn: Connection) -> bool | object:
        """One request; CONTINUE when it has no answer (a request follows at once)."""
        frame = read_frame(conn.sock, REQUEST_MAGIC)
        op = frame.kind
        handler = self._handler(op, frame.flags, conn)
        try:
            if handler is None:
                raise InvalidArgument("op", f"unknown operation {op}")
            # gets and puts are transfers (refused while the node drains); the rest end them
            running = self.transfers.running() if op in (GET, PUT) else contextlib.nullcontext()
            with running:
                handler(self, conn, frame)
        except ChannelError:
            raise  # the connection is out of step or gone: it closes
        except (KVStoreError, FrameError) as exc:
            if op not in NO_REPLY:
                self.reply_error(conn, exc)
            else:
                log.info("data connection from %s: %s", conn.host, exc)
        return CONTINUE if op in NO_REPLY else True

    @staticmethod
    def _handler(
        op: int, flags: int, conn: Connection
    ) -> Callable[[ChannelServer, Connection, Frame], None] | None:
        if flags & SHM and conn.kind != "unix":
            return _not_here
        path = shm if flags & SHM else tcp
        return {
            GET: path.get,
            PUT: path.put,
            COMMIT: shm.commit,
            LOOKUP: lookup,
            RELEASE: release,
            RENEW: renew,
        }.get(op)

    def wanted(
        self, conn: Connection, meta: bytes, *, unique: bool = True
    ) -> tuple[list[bytes], list[bytes]]:
        """The keys a get, lease or lookup names, as the caller names them and as the node
        does, once fetched and waited for as it asks."""
        request = parse(meta, pb.GetRequest)
        asked = check_keys(request.keys, unique=unique)
        keys = conn.tenant.keys(asked)
        if self.fetcher is not None:
            self.fetcher.ensure(
                keys, request.wait_ms, request.fetch, lambda: _peer_there(conn.sock)
            )
        return asked, keys

    def reply(self, conn: Connection, message: bytes, *, flags: int = 0, data_len: int = 0) -> None:
        conn.sock.sendall(encode(REPLY_MAGIC, 0, flags, message, data_len))

    def reply_error(self, conn: Connection, exc: Exception) -> None:
        text = (str(exc) or type(exc).__name__).encode()
        busy = isinstance(exc, Busy)
        if busy:
            self.transfers.refused_busy()
        status = status_of(exc).value[0]
        conn.sock.sendall(encode(REPLY_MAGIC, status, BUSY if busy else 0, text))

    # -- expiry -----------------------------------------------------------------

    def _sweep(self) -> None:
        """End what expired: leases and slots not renewed, connections idle too long."""
        while not self._stopping.wait(max(min(self.lease_ttl / 4, 1.0), 0.02)):
            now = time.monotonic()
            with self._lock:
                connections = list(self._connections.values())
            for conn in connections:
                with conn.lock:
                    expired = [k for k, h in conn.held.items() if h.expires < now]
                    ended = [conn.held.pop(k) for k in expired]
                for held in ended:
                    held.end()
                idle = IDLE_TIMEOUT if conn.open else self.timeout  # HELLO is due at once
                if now - conn.last_used > idle and not conn.held:
                    with contextlib.suppress(OSError):  # closed meanwhile by its peer
                        conn.sock.shutdown(socket.SHUT_RDWR)  # its next turn closes it


# -- operations served the same on both kinds of connection ------------------------


def lookup(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    _, keys = server.wanted(conn, frame.meta, unique=False)
    tiers = server.store.lookup(keys)
    server.reply(conn, pb.LookupReply(found=len(tiers), tiers=tiers).SerializeToString())


def release(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    """End leases (no answer: this rides ahead of the client's next request)."""
    for hold_id in parse(frame.meta, pb.Leases).ids:
        if (held := conn.take(hold_id)) is not None:
            held.end()


def renew(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    """Extend leases whose holder still uses them (no answer)."""
    expires = time.monotonic() + server.lease_ttl
    ids = parse(frame.meta, pb.Leases).ids
    with conn.lock:
        for hold_id in ids:
            if (held := conn.held.get(hold_id)) is not None:
                held.expires = expires


def _not_here(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    raise InvalidArgument("flags", "shared memory is only served over this node's Unix socket")


def _refuse(sock: socket.socket, exc: KVStoreError) -> None:
    text = str(exc).encode()[:4096]
    try:
        sock.sendall(HELLO_REPLY.pack(HELLO_MAGIC, status_of(exc).value[0], len(text), b"", 0))
        sock.sendall(text)
    except OSError:  # the peer is gone already
        pass
    sock.close()


def _check_same_user(sock: socket.socket) -> None:
    """Shared memory is for processes of the daemon's own user (or root)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _, uid, _ = _PEERCRED.unpack(creds)
    if uid not in (os.getuid(), 0):
        raise PermissionDenied(f"uid {uid} may not map this node's memory (runs as {os.getuid()})")


def _peer_there(sock: socket.socket) -> bool:
    """Whether the peer still holds its end open (a waiting request may be given up)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return not poller.poll(0)


def _tls_pending(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _buffered(sock: socket.socket) -> bool:
    """Whether the peer already sent more (a request right behind a release)."""
    if _tls_pending(sock):
        return True
    poller = select.poll()  # not select(): descriptors may pass FD_SETSIZE here
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _same_host(host: str) -> str:
    """One spelling per host: IPv4-mapped and IPv6 loopback fold onto IPv4."""
    host = host.removeprefix("::ffff:")
    return "127.0.0.1" if host == "::1" else host
