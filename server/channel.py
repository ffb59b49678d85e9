"""The request channel's listener (proto/DATAPLANE.md): TCP connections, and an abstract
Unix socket for clients on this host, that carry block operations themselves, one round
trip each, with no gRPC call on the way.

A bounded pool of threads serves every connection through one epoll set, so an idle
connection costs a file descriptor, not a thread: each thread waits in epoll for one
ready connection (one-shot, so no two threads serve one connection at once), takes what it
sent without waiting for more, serves its request once that is whole and re-arms the
connection. The TLS handshake, HELLO and each request's header and metadata are gathered
that way, in turns, so a peer that sends them slowly holds no thread; it has a total
deadline instead (`min(timeout, 5 s)` from its accept to a whole HELLO, `timeout` plus the
metadata at `min_rate` from a request's first byte to its last byte of metadata, and no
stall of `timeout` in between), past which the sweeper closes it. Connections are
bounded in total and per host. A transfer has a deadline (`timeout` plus its bytes at
`min_rate`) however its bytes trickle in; past it the connection is dropped and whatever
it reserved or pinned is freed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvstore.errors import (
    InvalidArgument,
    KVStoreError,
    PermissionDenied,
    ResourceExhausted,
)
from kvstore.keys import check_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    BUSY,
    COMMIT,
    GET,
    HEADER,
    HELLO,
    HELLO_MAGIC,
    HELLO_REPLY,
    LOOKUP,
    NIXL_GET,
    NIXL_PUT,
    NIXL_SESSION,
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
    stall_timeout,
    unpack_header,
)
from kvstore.proto.frames import FrameError, parse
from kvstore.proto.status import status_of
from kvstore.server import nixl, shm, tcp
from kvstore.server.nixl import NixlNode
from kvstore.server.policy import Ask, Caller, PutSlots, Reading, RequestPolicy
from kvstore.tenants import OPEN, Tenant

log = logging.getLogger("kvstore.dataplane")
IDLE_TIMEOUT = 600.0  # a pooled connection may wait this long for its next request
HELLO_TIMEOUT = 5.0  # at most this (and --data-timeout) from accept to a whole HELLO
WAIT_IN = select.EPOLLIN | select.EPOLLONESHOT
WAIT_OUT = select.EPOLLOUT | select.EPOLLONESHOT  # a TLS handshake with its reply unsent
META_CHUNK = 1 << 20  # metadata is gathered as it comes, in reads of at most this
CONTINUE = object()  # a request answered by nothing: the one behind it may be waiting
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(eq=False)
class Held:
    """What a connection holds between requests: a lease's pins or a put's slots."""

    what: Reading | PutSlots
    expires: float

    def end(self) -> None:
        self.what.end()


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    kind: str  # "tcp" or "unix"
    host: str  # the peer's address; "local" over the Unix socket
    due: float  # when what it started to send (HELLO; a request's header and metadata)
    # must be whole, or it is closed; inf while nothing is started
    fd: int = -1  # its key in the server's table, also once the socket is closed
    open: bool = False  # HELLO done
    handshake: bool = False  # TLS, not handshaken yet (once it is: non-blocking in epoll)
    tenant: Tenant = OPEN  # whose ticket opened it
    last_used: float = field(default_factory=time.monotonic)
    held: dict[int, Held] = field(default_factory=dict)  # lease or put id -> what it holds
    lock: threading.Lock = field(default_factory=threading.Lock)
    # what it sent so far of its HELLO or of its next request, gathered between turns
    part: bytearray = field(default_factory=bytearray)  # the HELLO's or header's bytes
    header: tuple[int, int, int, int] | None = None  # op, flags, meta and data lengths
    meta: list[bytes] = field(default_factory=list)
    meta_got: int = 0
    heard: float = field(default_factory=time.monotonic)  # when the last of it came
    nixl: set[int] = field(default_factory=set)  # the NIXL sessions it opened: they end with it

    def caller(self) -> Caller:
        """Its requests' caller, as the request policy knows it ("shm": its Unix socket)."""
        path = "shm" if self.kind == "unix" else "tcp"
        return Caller(self.tenant, path, self, lambda: _peer_there(self.sock))

    def hold(self, what: Reading | PutSlots, ttl: float) -> int:
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
        policy: RequestPolicy,
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
        nixl: NixlNode | None = None,
    ) -> None:
        self.nixl = nixl  # payloads through NIXL too (server/nixl.py)
        self.tls = tls  # TCP connections speak TLS (the Unix socket never leaves the host)
        self.policy = policy
        self.store = policy.store  # its host arena: what the Unix socket's clients map
        self.instance = instance
        self.timeout = timeout
        self.hello_timeout = min(timeout, HELLO_TIMEOUT)
        self.min_rate = min_rate
        self.lease_ttl = lease_ttl
        self.max_connections = max_connections
        self.max_per_host = max_per_host
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
        if unix and self.store.host.arena.segment_fd >= 0:
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
                sock.close()
                continue
            due = time.monotonic() + self.hello_timeout
            conn = Connection(sock, kind, host, due, sock.fileno())
            conn.handshake = self.tls is not None and kind == "tcp"
            with self._lock:
                self._connections[conn.fd] = conn
            self._poll.register(conn.fd, WAIT_IN)
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
        """Take what a ready connection sent, without waiting for more; serve its HELLO or
        request once that is whole (requests sent together, in turn), then wait for it
        again; close it on a protocol error, a broken socket or a missed deadline."""
        try:
            wait = self._turn(conn)
        except (ChannelError, ConnectionError, TimeoutError, OSError) as exc:
            log.info("data connection from %s ended: %s", conn.host, exc)
            wait = 0
        except Exception:
            log.exception("data connection from %s: internal error", conn.host)
            wait = 0
        if wait:
            try:
                self._poll.modify(conn.fd, wait)
                return
            except (OSError, ValueError):  # closed meanwhile
                pass
        self._close(conn)

    def _turn(self, conn: Connection) -> int:
        """Serve what is whole; the epoll events to wait for next, 0 to close."""
        while True:
            got = self._gather(conn)
            if isinstance(got, int):  # more must come first: no thread waits for it
                return got
            tls = isinstance(conn.sock, ssl.SSLSocket)
            if tls:  # served as plain sockets are: blocking, each call bounded (stall_timeout)
                conn.sock.setblocking(True)
            keep = self._request(conn, got) if isinstance(got, Frame) else self._hello(conn, got)
            if not keep:
                return 0
            if tls:
                conn.sock.setblocking(False)
            conn.last_used = time.monotonic()
            # a release or renewal: the request behind it may be here already; and TLS may
            # hold the next request decrypted, where epoll cannot see it
            if keep is not CONTINUE and not _tls_pending(conn.sock):
                return WAIT_IN

    def _gather(self, conn: Connection) -> int | bytes | Frame:
        """Read, without waiting, what the connection sent of its TLS handshake, HELLO or
        next request's header and metadata: the HELLO or the request once whole, else the
        epoll events to wait for. The sweeper closes it if that takes too long."""
        sock = conn.sock
        if conn.handshake:
            if not isinstance(sock, ssl.SSLSocket):
                assert self.tls is not None
                sock = conn.sock = self.tls.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                sock.setblocking(False)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                return WAIT_IN
            except ssl.SSLWantWriteError:
                return WAIT_OUT
            conn.handshake = False
        size = HEADER.size if conn.open else HELLO.size
        while len(conn.part) < size:
            chunk = _recv_now(sock, size - len(conn.part))
            if not chunk:
                return WAIT_IN
            conn.heard = time.monotonic()
            if conn.open and not conn.part:  # a request begins: it has a deadline
                conn.due = conn.heard + self.timeout
            conn.part += chunk
        if not conn.open:
            hello = bytes(conn.part)
            conn.part.clear()
            conn.due = math.inf
            return hello
        if conn.header is None:
            conn.header = unpack_header(conn.part, REQUEST_MAGIC)
            conn.due += conn.header[2] / self.min_rate
        op, flags, meta_len, data_len = conn.header
        while conn.meta_got < meta_len:
            chunk = _recv_now(sock, min(meta_len - conn.meta_got, META_CHUNK))
            if not chunk:
                return WAIT_IN
            conn.meta.append(chunk)
            conn.meta_got += len(chunk)
            conn.heard = time.monotonic()
        meta = conn.meta[0] if len(conn.meta) == 1 else b"".join(conn.meta)
        conn.part.clear()
        conn.header, conn.meta, conn.meta_got = None, [], 0
        conn.due = math.inf
        return Frame(op, flags, meta, data_len)

    def _close(self, conn: Connection) -> None:
        with self._lock:
            if self._connections.get(conn.fd) is not conn:
                return
            del self._connections[conn.fd]
            self._per_host[conn.host] -= 1
            if not self._per_host[conn.host]:
                del self._per_host[conn.host]
        if conn.sock.fileno() >= 0:
            with contextlib.suppress(OSError, ValueError):  # the socket failed: epoll dropped it
                self._poll.unregister(conn.fd)
        conn.sock.close()
        conn.release_all()  # pins and slots of a client gone: free at once
        if self.nixl is not None:
            self.nixl.closed(conn)  # and its NIXL sessions, once it used them alone

    # -- opening ----------------------------------------------------------------

    def _hello(self, conn: Connection, head: bytes) -> bool:
        magic, version, ticket, proof = HELLO.unpack(head)
        try:
            if magic != HELLO_MAGIC:
                raise InvalidArgument("hello", "not a kvstore channel (expected KVC1)")
            if version != VERSION:
                raise InvalidArgument("hello", f"channel version {version}; this node: {VERSION}")
            if conn.kind == "unix":
                _check_same_user(conn.sock)
            local = conn.kind == "unix"
            tenant = self.policy.opened(ticket, None if local else conn.host, proof, shm=local)
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

    def _request(self, conn: Connection, frame: Frame) -> bool | object:
        """One request; CONTINUE when it has no answer (a request follows at once)."""
        op = frame.kind
        handler = self._handler(op, frame.flags, conn)
        try:
            if handler is None:
                raise InvalidArgument("op", f"unknown operation {op}")
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
            NIXL_SESSION: nixl.session,
            NIXL_GET: nixl.get,
            NIXL_PUT: nixl.put,
        }.get(op)

    def ask(self, meta: bytes | pb.GetRequest) -> Ask:
        """What a get, lease or lookup asks for (its metadata, or the request parsed); its
        answer is due within the data plane's allowance, plus the wait it asks."""
        request = meta if isinstance(meta, pb.GetRequest) else parse(meta, pb.GetRequest)
        answer_by = self.deadline(0) + request.wait_ms / 1000
        return Ask(request.keys, request.wait_ms, request.fetch, answer_by)

    def reply(self, conn: Connection, message: bytes, *, flags: int = 0, data_len: int = 0) -> None:
        conn.sock.sendall(encode(REPLY_MAGIC, 0, flags, message, data_len))

    def reply_error(self, conn: Connection, exc: Exception) -> None:
        text = (str(exc) or type(exc).__name__).encode()
        code, busy = status_of(exc)  # a busy refusal was counted where it was made
        conn.sock.sendall(encode(REPLY_MAGIC, code.value[0], BUSY if busy else 0, text))

    # -- expiry -----------------------------------------------------------------

    def _sweep(self) -> None:
        """End what expired: leases and slots not renewed, connections idle too long."""
        period = min(self.lease_ttl, self.hello_timeout) / 4
        while not self._stopping.wait(max(min(period, 1.0), 0.02)):
            now = time.monotonic()
            with self._lock:
                connections = list(self._connections.values())
            for conn in connections:
                with conn.lock:
                    expired = [k for k, h in conn.held.items() if h.expires < now]
                    ended = [conn.held.pop(k) for k in expired]
                for held in ended:
                    held.end()
                # a HELLO or request begun and not whole by its deadline, or stalled
                late = now > conn.due or (conn.due < math.inf and now - conn.heard > self.timeout)
                idle = now - conn.last_used > IDLE_TIMEOUT and not conn.held and not conn.nixl
                if late or idle:
                    with contextlib.suppress(OSError):  # closed meanwhile by its peer
                        conn.sock.shutdown(socket.SHUT_RDWR)  # its next turn closes it


# -- operations served the same on both kinds of connection ------------------------


def lookup(server: ChannelServer, conn: Connection, frame: Frame) -> None:
    ask = server.ask(frame.meta)
    tiers = server.policy.lookup(conn.caller(), replace(ask, keys=check_keys(ask.keys)))
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
    """A refused HELLO's answer; the caller closes the socket (`_close` for a connection
    in the table, so that its slot there and its host's count are given back)."""
    text = str(exc).encode()[:4096]
    try:
        sock.sendall(HELLO_REPLY.pack(HELLO_MAGIC, status_of(exc)[0].value[0], len(text), b"", 0))
        sock.sendall(text)
    except OSError:  # the peer is gone already
        pass


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


def _recv_now(sock: socket.socket, most: int) -> bytes:
    """Up to `most` bytes the peer sent already, b"" when none is here yet; ChannelError
    once it closed. A TLS socket is non-blocking while it waits in epoll; a plain one stays
    blocking for its handler, and this read alone does not wait."""
    try:
        if isinstance(sock, ssl.SSLSocket):
            chunk = sock.recv(most)
        else:
            chunk = sock.recv(most, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
        return b""
    if not chunk:
        raise ChannelError("the peer closed the connection")
    return chunk


def _same_host(host: str) -> str:
    """One spelling per host: IPv4-mapped and IPv6 loopback fold onto IPv4."""
    host = host.removeprefix("::ffff:")
    return "127.0.0.1" if host == "::1" else host
