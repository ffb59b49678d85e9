"""A client's connections to a node's request channel (proto/DATAPLANE.md).

Each connection is opened with a single-use ticket from gRPC `Hello` and pooled. What a
client owes the node on a connection (releases of leases it is done with, renewals of
those it still holds) rides ahead of the next request on that connection, so ending a
lease costs no round trip; a keeper thread sends what is owed on idle connections.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kvstore.client.security import Security
from kvstore.client.status import error_from_number
from kvstore.errors import Unavailable, Unsupported
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import (
    HELLO_MAGIC,
    HELLO_REPLY,
    RELEASE,
    RENEW,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    ChannelError,
    Frame,
    encode,
    hello_frame,
    read_frame,
    recv_exact,
    send_views,
    stall_timeout,
)

log = logging.getLogger("kvstore.client")
FLUSH_AFTER = 0.02  # seconds a release may wait for a request to ride with
ARENA_NAME = "/memfd:kvstore-arena"


class Unreachable(Unavailable):
    """The data plane could not be reached: the client may take another path."""


class NodeChanged(Unreachable):
    """The address answers as another node now (a restart): start over with it."""


@dataclass(eq=False)
class Link:
    """One open connection, and what the client owes the node on it."""

    sock: socket.socket
    released: list[int] = field(default_factory=list)
    leases: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # held through it
    broken: bool = False

    def owed(self) -> list[bytes]:
        """Frames to send ahead of the next request: releases, and renewals now due."""
        frames = []
        if self.released:
            ids, self.released = self.released, []
            frames.append(encode(REQUEST_MAGIC, RELEASE, 0, pb.Leases(ids=ids).SerializeToString()))
        now = time.monotonic()
        due = [lease.renewed(now) for lease in list(self.leases) if lease.due(now)]
        if due:
            frames.append(encode(REQUEST_MAGIC, RENEW, 0, pb.Leases(ids=due).SerializeToString()))
        return frames


class Channels:
    """Pooled connections of one kind ("tcp" or "unix") to one node."""

    def __init__(
        self,
        kind: str,
        hello: Callable[[], pb.NodeInfo],
        info: pb.NodeInfo,
        grpc_host: str,
        timeout: float | None,
        security: Security,
    ) -> None:
        self.kind = kind
        self.security = security
        self._hello = hello
        self.instance = info.instance  # the daemon's run: a restart is another
        self.timeout = timeout
        self.address = info.unix_address if kind == "unix" else info.data_address
        if kind == "unix" and not self.address.startswith("kvstore-"):
            raise Unsupported(
                "the node offers no shared memory to this host (or, with tenants, this token)"
            )
        if kind == "tcp" and not self.address:
            raise Unsupported("the node runs no data plane (--data-address off)")
        self._grpc_host = grpc_host
        self._idle: list[Link] = []
        self._all: weakref.WeakSet[Link] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.arena: np.ndarray | None = None  # unix: the node's arena, mapped here
        self._mmap: mmap.mmap | None = None
        self._keeper = Keeper(self)
        self._idle_put(self._open())  # opening the first proves the path works

    # -- the pool -----------------------------------------------------------------

    @contextmanager
    def link(self) -> Iterator[Link]:
        """A connection of the pool; back into it only if the exchange ended cleanly."""
        link = self.checkout()
        try:
            yield link
        except BaseException as exc:
            self.checkin(link, ok=False)
            if isinstance(exc, OSError) and not isinstance(exc, ChannelError):
                raise ChannelError(f"data connection lost: {exc}") from None
            raise
        self.checkin(link)

    def checkout(self) -> Link:
        """A connection of the pool for an exchange that outlives one call (`checkin` it)."""
        return self._idle_take()

    def checkin(self, link: Link, ok: bool = True) -> None:
        if ok:
            self._idle_put(link)
        else:
            link.broken = True
            link.sock.close()

    def send(self, link: Link, views: Sequence[memoryview | bytes]) -> None:
        """Send payloads the node asked for; if it closed the connection instead, read
        why (its refusal) rather than report a broken pipe."""
        try:
            send_views(link.sock, views)
        except OSError as exc:
            self.answer(link)
            raise ChannelError(f"data connection lost: {exc}") from None

    def request(
        self,
        link: Link,
        op: int,
        meta: bytes,
        *,
        flags: int = 0,
        views: Sequence[memoryview] = (),
        data_len: int = 0,
        waiting: Callable[[socket.socket], None] | None = None,
    ) -> Frame:
        """Send one request (after what is owed on `link`) and read its answer's header and
        metadata; an error answer raises its kvstore exception. `waiting(sock)`: what to do
        until the answer is there to read (make NIXL progress)."""
        with self._lock:  # releases may be owed from other threads meanwhile
            frames = link.owed()
        frames.append(encode(REQUEST_MAGIC, op, flags, meta, data_len))
        self.send(link, [*frames, *views])
        if waiting is not None:
            waiting(link.sock)
        return self.answer(link)

    def answer(self, link: Link) -> Frame:
        try:
            frame = read_frame(link.sock, REPLY_MAGIC)
        except (OSError, ValueError) as exc:
            if isinstance(exc, ChannelError):
                raise
            raise ChannelError(f"data connection lost: {exc}") from None
        if frame.kind:
            raise error_from_number(frame.kind, frame.meta.decode(errors="replace"), frame.flags)
        return frame

    def owe_release(self, link: Link, lease: int) -> None:
        with self._lock:
            link.released.append(lease)
        self._keeper.wake()

    def close(self) -> None:
        self._keeper.stop()
        with self._lock:
            idle, self._idle = self._idle, []
        for link in idle:
            link.broken = True
            link.sock.close()

    def _idle_take(self) -> Link:
        with self._lock:
            if self._idle:
                return self._idle.pop()  # if the node closed it, the client retries afresh
        return self._open()

    def _idle_put(self, link: Link) -> None:
        with self._lock:
            self._idle.append(link)

    def _flush_idle(self) -> None:
        """Send what is owed on idle connections (the keeper's turn): small frames, so
        the pool stays locked meanwhile. A connection in use sends its own with its next
        request."""
        with self._lock:
            for link in list(self._idle):
                frames = link.owed()
                try:
                    if frames:
                        send_views(link.sock, frames)
                except OSError:
                    link.broken = True
                    link.sock.close()
                    self._idle.remove(link)

    # -- opening --------------------------------------------------------------

    def _open(self) -> Link:
        info = self._hello()  # a fresh ticket for this connection
        if info.instance != self.instance:
            raise NodeChanged("the node restarted since this client met it")
        sock = self._connect()
        try:
            if self.kind == "tcp":
                sock = self.security.wrap(sock, self._host())
            sock.sendall(hello_frame(info.ticket, self.security.token))
            self._opened(sock)
        except OSError as exc:
            sock.close()
            raise Unreachable(f"data plane {self.address} dropped the connection: {exc}") from None
        except BaseException:
            sock.close()
            raise
        link = Link(sock)
        self._all.add(link)
        return link

    def _connect(self) -> socket.socket:
        try:
            if self.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout or 30)  # connecting only
                sock.connect("\0" + self.address)
            else:
                port = self.address.rpartition(":")[2]
                sock = socket.create_connection(
                    (self._host(), int(port)), timeout=self.timeout or 30
                )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            if self.kind == "unix":
                raise Unsupported("the node's shared memory is not on this host") from None
            raise Unreachable(f"data plane {self.address} unreachable: {exc}") from None
        stall_timeout(sock, self.timeout)
        return sock

    def _host(self) -> str:
        host = self.address.rpartition(":")[0].strip("[]")
        return self._grpc_host if host in ("0.0.0.0", "::", "") else host  # bound everywhere

    def _opened(self, sock: socket.socket) -> None:
        """Read the node's answer to HELLO; over the Unix socket it carries the arena."""
        head = memoryview(bytearray(HELLO_REPLY.size))
        fds: list[int] = []
        if self.kind == "unix":
            data, fds, _, _ = socket.recv_fds(sock, HELLO_REPLY.size, 1)
            head[: len(data)] = data
            got = len(data)
            if not data:
                raise ChannelError("the node closed the connection at once")
            recv_exact(sock, head[got:])
        else:
            recv_exact(sock, head)
        try:
            magic, status, length, instance, size = HELLO_REPLY.unpack(head)
            if magic != HELLO_MAGIC:
                raise ChannelError("the data plane answered something that is not kvstore")
            if status:
                text = memoryview(bytearray(length))
                recv_exact(sock, text)
                raise error_from_number(status, bytes(text).decode(errors="replace"))
            if instance.hex() != self.instance:
                raise Unreachable("another node answered on that data plane")
            if self.kind == "unix" and self._mmap is None:
                self._map(fds, size)
        finally:
            for fd in fds:
                os.close(fd)

    def _map(self, fds: list[int], size: int) -> None:
        """Map the arena from the descriptor the node sent, once it is proven to be the
        node's anonymous shared memory: never a path, never a file of anyone's."""
        if len(fds) != 1:
            raise Unsupported("the node sent no shared memory")
        fd = fds[0]
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not target.startswith(ARENA_NAME) or os.fstat(fd).st_size != size:
            raise Unsupported("what the node sent is not its arena")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no faults while copying
        self._mmap = mmap.mmap(fd, size, flags=flags)
        self.arena = np.frombuffer(self._mmap, np.uint8)


class Keeper:
    """Sends what a client owes on idle connections: releases soon after they are owed,
    renewals of the leases it still holds before they would expire."""

    def __init__(self, channels: Channels) -> None:
        self._channels = channels
        self._leases: weakref.WeakSet = weakref.WeakSet()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def track(self, lease: object) -> None:
        self._leases.add(lease)
        lease.link.leases.add(lease)  # type: ignore[attr-defined]
        self.wake()

    def wake(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="kvstore-keeper")
                self._thread.daemon = True
                self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._next_due())
            self._wake.clear()
            if self._stopped:
                return
            time.sleep(FLUSH_AFTER)  # let a request carry them first, if one is coming
            self._channels._flush_idle()

    def _next_due(self) -> float:
        now = time.monotonic()
        dues = [lease.renew_at - now for lease in list(self._leases) if lease.active]
        return max(min(dues, default=60.0), FLUSH_AFTER)
