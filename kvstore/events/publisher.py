"""vLLM's ZMQ transport for a log: batches on PUB, missed ones again through a ROUTER replay."""

from __future__ import annotations

import logging
import threading

import zmq

from kvstore.events.log import EventLog

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the sequence frame that ends a replay


class ZmqPublisher:
    """Publishes a log's batches as vLLM's `ZmqEventPublisher` does, and answers its replays.

    PUB frames: `(topic, sequence as 8 big-endian bytes, payload)`. A replay request is
    `[b"", start]` from a DEALER; the answer is one `(topic, sequence, payload)` message per
    retained batch from `start` on, then `(b"", END_SEQ, b"")` (a REQ socket, which sends
    `[start]`, keeps only the first answer, as with vLLM). `endpoint` follows vLLM's rule:
    bound when it holds `*` or `::` or is ipc:// or inproc://, else connected to (a router
    that binds its SUB); `replay_endpoint` is always bound. The attributes of the same names
    give the bound addresses, with the ports the OS chose.

    One thread publishes from the log's live end on; another answers replays from the log's
    ring, with batches already published only, so that a subscriber never gets a batch by
    replay before PUB has sent it. A publisher so far behind that the log dropped batches it
    had not sent skips them (counted in `lost`); subscribers see the gap in the sequence.
    Nothing here blocks an append.
    """

    def __init__(
        self,
        log: EventLog,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        hwm: int = 100_000,
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
        try:
            self._pub = self._socket(zmq.PUB)
            self._pub.set_hwm(hwm)
            self.endpoint = _bind_or_connect(self._pub, endpoint)
            if replay_endpoint is not None:
                self._replay = self._socket(zmq.ROUTER)
                # a ROUTER silently drops what exceeds a peer's high-water mark: let one replay
                # of the whole ring fit (zmq's default of 1000 would cut vLLM's 10_000 short)
                self._replay.setsockopt(zmq.SNDHWM, log.retained_batches + 1)
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
            while self._stop_rx not in dict(poller.poll()):
                self._answer(self._replay.recv_multipart())
        except zmq.ZMQError:
            log.exception("KV event replay stopped")

    def _answer(self, frames: list[bytes]) -> None:
        """Serve one request, `[identity, b"", start]` as the ROUTER receives it."""
        assert self._replay is not None
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("ignoring a malformed replay request of %d frames", len(frames))
            return
        client, _, start = frames
        for batch in self._log.retained(int.from_bytes(start, "big"), until=self._published):
            seq = batch.sequence.to_bytes(8, "big")
            self._replay.send_multipart((client, b"", self._topic, seq, batch.payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))


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
