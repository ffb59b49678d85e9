"""vLLM's ZMQ transport for a log: batches on PUB, missed ones again through a ROUTER replay."""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from kvstore.events.log import EventLog

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the sequence frame that ends a replay
BUSY = b"busy"  # the end marker's payload for a replay refused: as many are served already
DROPPED = b"dropped"  # its payload for a replay stopped because its reader took nothing
_OWED_ENDS = 256  # end markers kept for readers whose queue is full, the oldest forgotten
_OWED_RETRY_S = 0.2
_MAX_WAIT_S = 0.05  # the longest a replay blocked by a full queue waits before a retry


class ZmqPublisher:
    """Publishes a log's batches as vLLM's `ZmqEventPublisher` does, and answers its replays.

    PUB frames: `(topic, sequence as 8 big-endian bytes, payload)`. A replay request is
    `[b"", start]` from a DEALER; the answer is one `(topic, sequence, payload)` message per
    retained batch from `start` on, then `(b"", END_SEQ, b"")` (a REQ socket, which sends
    `[start]`, keeps only the first answer, as with vLLM). A request past `replay_clients`
    served at once gets the end marker alone, with payload `BUSY`: ask again later.
    `endpoint` follows vLLM's rule: bound when it holds `*` or `::` or is ipc:// or inproc://,
    else connected to (a router that binds its SUB); `replay_endpoint` is always bound. The
    attributes of the same names give the bound addresses, with the ports the OS chose.

    One thread publishes from the log's live end on; another answers replays from the log's
    ring, with batches already published only, so that a subscriber never gets a batch by
    replay before PUB has sent it. A publisher so far behind that the log dropped batches it
    had not sent skips them (counted in `lost`); subscribers see the gap in the sequence.
    Nothing here blocks an append.

    Slow readers cost little: PUB queues at most `hwm` batches per subscriber and drops the
    rest (the subscriber sees a gap and replays). The replay queues at most `replay_hwm`
    batches per client (ROUTER_MANDATORY: a full queue is seen, never silently cut), keeps a
    cursor per request, not its batches, and takes batches from the log a queue's worth at a
    time; a client that takes nothing for `replay_stall` seconds is dropped (its end marker,
    payload `DROPPED`, follows once it reads again). Batches stay small (see `EventLog`), so
    the bytes queued are at most about `replay_clients * replay_hwm` batches for replays
    served, plus `replay_hwm` for a stopped client still connected.
    """

    def __init__(
        self,
        log: EventLog,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        hwm: int = 128,
        replay_hwm: int = 16,
        replay_clients: int = 8,
        replay_stall: float = 5.0,
        linger_ms: int = 100,
        context: zmq.Context | None = None,
    ) -> None:
        self._log = log
        self._topic = topic.encode()
        self._linger_ms = linger_ms
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._replay: zmq.Socket | None = None
        self.replay_endpoint: str | None = None
        self._replay_hwm = replay_hwm
        self._replay_clients = replay_clients
        self._replay_stall = replay_stall
        self._serving: dict[bytes, _Replay] = {}  # by client identity, in arrival order
        self._owed: OrderedDict[bytes, bytes] = OrderedDict()  # end markers not yet queued
        self._owed_at = 0.0
        try:
            self._pub = self._socket(zmq.PUB)
            self._pub.set_hwm(hwm)
            self.endpoint = _bind_or_connect(self._pub, endpoint)
            if replay_endpoint is not None:
                self._replay = self._socket(zmq.ROUTER)
                # a peer's queue holds replay_hwm batches; past it a send says EAGAIN instead of
                # dropping the batch, and a peer gone says EHOSTUNREACH
                self._replay.setsockopt(zmq.SNDHWM, replay_hwm)
                self._replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self.replay_endpoint = _bind(self._replay, replay_endpoint)
                self._stop_rx, self._stop_tx = self._socket(zmq.PAIR), self._socket(zmq.PAIR)
                _pair(self._stop_rx, self._stop_tx)
        except zmq.ZMQError:
            self._release()
            raise
        self._watch = log.watch(skip_lost=True)
        self._published = self._watch.next_sequence  # replays serve the sequences below this
        self._threads = [threading.Thread(target=self._publish_loop, name="kvstore-events-pub")]
        if self._replay is not None:
            self._threads.append(threading.Thread(target=self._replay_loop, name="kvstore-replay"))
        self._closed = False
        for thread in self._threads:
            thread.daemon = True  # a publisher never closed must not hold the process up
            thread.start()

    @property
    def lost(self) -> int:
        """Batches the log dropped before this publisher could send them."""
        return self._watch.lost

    def close(self, timeout: float = 5.0) -> None:
        """Stop both threads, close the sockets. Close the log first to publish its tail."""
        if self._closed:
            return
        self._closed = True
        if self._log.closed:  # then the watch ends by itself once the tail is sent
            self._threads[0].join(timeout)
        self._watch.cancel()
        if self._replay is not None:
            self._stop_tx.send(b"")
        for thread in self._threads:
            thread.join()
        self._release()

    def __enter__(self) -> ZmqPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, self._linger_ms)  # how long close() lets queued frames go
        self._sockets.append(sock)
        return sock

    def _release(self) -> None:
        for sock in self._sockets:
            sock.close()
        if self._own_context:
            self._ctx.term()

    def _publish_loop(self) -> None:
        try:
            for batch in self._watch:
                seq = batch.sequence.to_bytes(8, "big")
                self._pub.send_multipart((self._topic, seq, batch.payload))
                self._published = batch.sequence + 1
        except zmq.ZMQError:
            log.exception("KV event publisher stopped")

    def _replay_loop(self) -> None:
        assert self._replay is not None
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(self._wait_ms()))
                if self._stop_rx in ready:
                    return
                if self._replay in ready:
                    for _ in range(64):  # what has arrived, then back to the replays
                        try:
                            frames = self._replay.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._answer(frames)
                self._pump()
        except zmq.ZMQError:
            log.exception("KV event replay stopped")

    def _wait_ms(self) -> int | None:
        """How long the replay thread may sleep: until a replay or an owed end is due."""
        due = [r.retry_at for r in self._serving.values()]
        if self._owed:
            due.append(self._owed_at)
        if not due:
            return None
        return max(0, math.ceil((min(due) - time.monotonic()) * 1000))

    def _answer(self, frames: list[bytes]) -> None:
        """Take one request, `[identity, b"", start]` as the ROUTER receives it."""
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("ignoring a malformed replay request of %d frames", len(frames))
            return
        client, _, start = frames
        if client in self._owed and not self._end(client, self._owed[client]):
            return  # it still does not read: this request goes the way of its last one
        replay = self._serving.get(client)
        if replay is not None:  # served after the one in progress, in order
            if len(replay.queued) < self._replay_hwm:
                replay.queued.append(int.from_bytes(start, "big"))
            return
        if len(self._serving) >= self._replay_clients:
            log.debug("refusing a replay: %d in progress", len(self._serving))
            self._end(client, BUSY)
            return
        now = time.monotonic()
        self._serving[client] = _Replay(client, int.from_bytes(start, "big"), self._published, now)

    def _pump(self) -> None:
        """Send every replay that is due a queue's worth of batches; retry owed end markers."""
        now = time.monotonic()
        for replay in list(self._serving.values()):
            if replay.retry_at <= now:
                self._serve(replay, now)
        if self._owed and self._owed_at <= now:
            for client, reason in list(self._owed.items()):
                self._end(client, reason)
            self._owed_at = now + _OWED_RETRY_S

    def _serve(self, replay: _Replay, now: float) -> None:
        """Send `replay` batches until its queue is full or it ends. It takes at most a queue's
        worth of batches from the log and holds none once it returns."""
        client = replay.client
        batches = self._log.retained(replay.next, replay.until, limit=self._replay_hwm)
        for batch in batches:
            seq = batch.sequence.to_bytes(8, "big")
            sent = self._send((client, b"", self._topic, seq, batch.payload))
            if not sent:
                self._blocked(replay, sent, now)
                return
            replay.next, replay.progress, replay.wait = batch.sequence + 1, now, 0.0
        if batches and replay.next < replay.until:
            replay.retry_at = now  # more to send: again on the next round, after the others
            return
        replay.next = replay.until  # what the log dropped meanwhile is gone: a gap, as on PUB
        sent = self._send((client, b"", b"", END_SEQ, b""))
        if not sent:
            self._blocked(replay, sent, now)
            return
        del self._serving[client]
        if replay.queued:  # the client's next request
            start = replay.queued.pop(0)
            again = _Replay(client, start, self._published, now, queued=replay.queued)
            self._serving[client] = again

    def _blocked(self, replay: _Replay, sent: bool | None, now: float) -> None:
        """The client's queue is full (`sent` False) or the client is gone (None)."""
        if sent is None:
            del self._serving[replay.client]
        elif now - replay.progress > self._replay_stall:
            log.info("dropped a replay client that took nothing for %.1f s", now - replay.progress)
            del self._serving[replay.client]
            self._owe(replay.client, DROPPED)
        else:  # back off from 1 ms up to _MAX_WAIT_S while it takes nothing
            replay.wait = min(max(2 * replay.wait, 0.001), _MAX_WAIT_S)
            replay.retry_at = now + replay.wait

    def _end(self, client: bytes, reason: bytes) -> bool:
        """Queue an end marker with `reason`; owe it when the client's queue is full."""
        sent = self._send((client, b"", b"", END_SEQ, reason))
        if sent is False:
            self._owe(client, reason)
            return False
        self._owed.pop(client, None)
        return True

    def _owe(self, client: bytes, reason: bytes) -> None:
        self._owed[client] = reason
        self._owed.move_to_end(client)
        while len(self._owed) > _OWED_ENDS:
            self._owed.popitem(last=False)

    def _send(self, frames: tuple[bytes, ...]) -> bool | None:
        """Queue one message: True; False when the client's queue is full; None when gone."""
        assert self._replay is not None
        try:
            self._replay.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                return None
            raise
        return True


@dataclass
class _Replay:
    """One replay in progress: where it is, not what it sends."""

    client: bytes
    next: int  # the sequence to send next
    until: int  # the batches below it, as published when the request came, then the end
    progress: float  # when a send last went through (monotonic)
    retry_at: float = 0.0
    wait: float = 0.0  # the back-off while the client's queue is full
    queued: list[int] = field(default_factory=list)  # later requests of the same client


def _bind_or_connect(sock: zmq.Socket, endpoint: str) -> str:
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        return _bind(sock, endpoint)
    sock.connect(endpoint)
    return endpoint


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind; return the address bound, with the port the OS chose for `*`."""
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _pair(rx: zmq.Socket, tx: zmq.Socket) -> None:
    """Join two PAIR sockets in-process: close() writes `tx` to wake the replay thread's poll."""
    address = f"inproc://kvstore-events-stop-{id(rx):x}"
    rx.bind(address)
    tx.connect(address)
