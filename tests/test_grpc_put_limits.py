"""gRPC put streams are held to the data plane's bounds: their bytes count in flight once
they begin to come, not as declared, and the node ends a stream that stalls past
--data-timeout or trickles below --min-rate, freeing what it held."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from test_cluster_index import poll
from test_metrics import scrape

from conftest import Daemon, running_daemon
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.frames import encode_data

MiB = 1 << 20
PUT = "/kvstore.v1.KVStore/Put"
TIMEOUT = 2.0  # --data-timeout
SLACK = 5.0  # the watchdog's own pace, and scheduling on a busy 2-core machine


@pytest.fixture
def node() -> Iterator[Daemon]:
    flags = ("--host-capacity", "160MiB", "--max-inflight-bytes", "64MiB", "--prefault", "false")
    with running_daemon(
        *flags, "--data-timeout", str(TIMEOUT), "--metrics-address", "127.0.0.1:0"
    ) as d:
        yield d


def header(key: bytes, size: int) -> bytes:
    block = pb.BlockHeader(key=key, meta=pb.BlockMeta(size=size))
    return pb.PutRequest(headers=pb.BlockHeaders(blocks=[block])).SerializeToString()


class RawPut:
    """A Put stream sent by hand from a thread of its own: `frames` (a generator that may
    block) is what it sends; `ended` is set, and `code` known, once its call ends."""

    def __init__(self, address: str, frames: Iterator[bytes]) -> None:
        self.ended = threading.Event()
        self.code: grpc.StatusCode | None = None
        self._channel = grpc.insecure_channel(address)
        self._thread = threading.Thread(target=self._run, args=(frames,), daemon=True)
        self._thread.start()

    def _run(self, frames: Iterator[bytes]) -> None:
        try:
            self._channel.stream_unary(PUT)(frames, timeout=120)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()
        self.ended.set()

    def close(self) -> None:
        self._channel.close()


@contextmanager
def silent_puts(address: str, keys: list[bytes], size: int) -> Iterator[list[RawPut]]:
    """Put streams that each declare one block of `size`, then send nothing at all."""
    release = threading.Event()

    def frames(key: bytes) -> Iterator[bytes]:
        yield header(key, size)
        release.wait(120)

    puts = [RawPut(address, frames(key)) for key in keys]
    try:
        yield puts
    finally:
        release.set()
        for put in puts:
            put.ended.wait(30)
            put.close()


def in_flight(d: Daemon) -> tuple[float, float]:
    """Transfers, and payload bytes, in flight on the node."""
    sample = scrape(d)
    return sample["kvstore_inflight_transfers", ()], sample["kvstore_inflight_bytes", ()]


def test_declared_bytes_block_no_one_and_silent_streams_are_ended(node) -> None:
    keys = block_keys(np.arange(4 * 16), 16, b"silent")
    payload = np.arange(4 * MiB, dtype=np.uint8)
    with (
        node.client(transport="grpc") as by_grpc,
        node.client(transport="tcp") as by_tcp,
        silent_puts(node.address, keys[:2], 64 * MiB) as silent,  # the node's whole bound
    ):
        poll(lambda: in_flight(node)[0] == 2)  # both streams are in, headers sent
        assert in_flight(node)[1] == 0  # declared, not arrived: nothing held
        for client, key in ((by_grpc, keys[2:3]), (by_tcp, keys[3:4])):
            assert client.put(key, [payload]).stored == 1  # no Busy
            assert np.array_equal(np.frombuffer(client.get(key)[0], np.uint8), payload)
        for put in silent:  # the node ends them: stalled past --data-timeout
            assert put.ended.wait(TIMEOUT + SLACK), "a silent put stream was never ended"
            assert put.code == grpc.StatusCode.CANCELLED
        poll(lambda: in_flight(node) == (0, 0))
        assert by_grpc.lookup(keys[:2]) == 0


def test_a_dripping_put_stream_is_ended_at_its_deadline(node) -> None:
    """A byte now and then never stalls for --data-timeout, but the whole put must be in
    by --data-timeout plus its bytes at --min-rate: past it, what it held is freed."""
    key = block_keys(np.arange(16), 16, b"drip")
    size = 8 * MiB  # due 2 s + 8 MiB at 32 MiB/s after it began
    stop = threading.Event()

    def frames() -> Iterator[bytes]:
        yield header(key[0], size)
        for _ in range(size):  # at this pace the bytes would take days
            if stop.wait(0.2):  # the drip itself: well under --data-timeout a byte
                return
            yield encode_data([b"x"])

    put = RawPut(node.address, frames())
    try:
        assert put.ended.wait(TIMEOUT + size / (32 * MiB) + SLACK), "never ended"
        assert put.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    finally:
        stop.set()
        put.close()
    poll(lambda: in_flight(node) == (0, 0))
    with node.client(transport="grpc") as client:
        assert client.lookup(key) == 0
