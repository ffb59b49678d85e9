"""Stopping a node: SIGTERM drains it, and a restart shows nothing partial."""

from __future__ import annotations

import signal
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cluster_index import poll
from test_metrics import scrape

from conftest import raw_channel, read_answer, running_daemon, send_request
from kvstore.errors import KVStoreError, ResourceExhausted, Unavailable
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import PUT, READY

MiB = 1 << 20


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_sigterm_drains_refuses_new_work_and_lets_transfers_finish(tmp_path) -> None:
    keys = block_keys(np.arange(4 * 16), 16, b"drain")
    with running_daemon("--host-capacity", "64MiB", "--drain-timeout", "60") as d:
        assert health(d.address) == health_pb2.HealthCheckResponse.SERVING
        with raw_channel(d.address) as slow, d.client(transport="tcp", timeout=10) as late:
            send_request(slow, PUT, pb.BlockHeaders(blocks=[
                pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=MiB))]))  # fmt: skip
            assert read_answer(slow).flags & READY  # in flight: half its bytes to come
            slow.sendall(b"s" * (MiB // 2))
            d.process.send_signal(signal.SIGTERM)
            status = health(d.address)
            while status == health_pb2.HealthCheckResponse.SERVING:  # the signal is handled
                status = health(d.address)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(Unavailable, match="shutting down"):
                late.put(keys[1:2], [b"too late"])
            slow.sendall(b"s" * (MiB // 2))  # the transfer in flight finishes...
            assert pb.PutReply.FromString(read_answer(slow).meta).stored == 1
        assert d.process.wait(timeout=60) == 0  # ...and then the node exits, cleanly


def test_sigterm_during_eight_transfers_leaves_nothing_partial(tmp_path) -> None:
    payloads = {t: [np.full(4 * MiB, t * 16 + i, np.uint8) for i in range(8)] for t in range(8)}
    keys = {t: block_keys(np.arange(8 * 16), 16, f"eight/{t}".encode()) for t in range(8)}
    flags = (
        "--host-capacity", "512MiB", "--disk-dir", str(tmp_path), "--persist-on-shutdown",
        "--drain-timeout", "60",
    )  # fmt: skip
    outcomes: dict[int, str] = {}
    with running_daemon(*flags) as d:
        started = threading.Barrier(9)

        def put(t: int) -> None:
            with d.client(transport="tcp" if t % 2 else "grpc", timeout=60) as c:
                started.wait()
                try:
                    for i in range(8):  # one block at a time: some land before the signal
                        c.put(keys[t][i : i + 1], payloads[t][i : i + 1])
                    outcomes[t] = "stored"
                except KVStoreError as exc:
                    outcomes[t] = type(exc).__name__

        threads = [threading.Thread(target=put, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        started.wait()
        d.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert d.process.wait(timeout=120) == 0
    assert len(outcomes) == 8 and set(outcomes.values()) <= {"stored", "Unavailable"}
    with running_daemon(*flags) as again, again.client() as c:
        for t in range(8):
            got = c.get(keys[t])  # a prefix: whatever landed before the drain, whole
            assert all(np.array_equal(g, p) for g, p in zip(got, payloads[t], strict=False))
            if outcomes[t] == "stored":
                assert len(got) == 8


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_bytes_in_flight_are_bounded_per_node_and_per_connection(transport: str) -> None:
    keys = block_keys(np.arange(4 * 16), 16, f"bound/{transport}".encode())
    block = np.full(MiB, 7, np.uint8)
    flags = ("--host-capacity", "64MiB", "--max-inflight-bytes", "1MiB")
    with (
        running_daemon(*flags, "--max-connection-bytes", "2MiB") as d,
        d.client(transport=transport, timeout=30) as c,
    ):
        with pytest.raises(ResourceExhausted, match="split the batch"):
            c.put(keys[:3], [block] * 3)  # 3 MiB on one connection
        with raw_channel(d.address) as slow:
            send_request(slow, PUT, pb.BlockHeaders(blocks=[
                pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=MiB))]))  # fmt: skip
            assert read_answer(slow).flags & READY  # 1 MiB in flight: the node's bound
            with pytest.raises(ResourceExhausted, match="in flight"):
                c.put(keys[1:2], [block])
            slow.sendall(block.tobytes())
            assert pb.PutReply.FromString(read_answer(slow).meta).stored == 1
        assert c.put(keys[1:3], [block] * 2).stored == 2  # within both bounds again
        with pytest.raises(ResourceExhausted, match="split the batch"):
            c.get(keys[:3])  # gets are bound the same
        assert [bytes(b) for b in c.get(keys[:2]) + c.get(keys[2:3])] == [block.tobytes()] * 3


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_a_busy_node_is_retried_until_it_has_room(transport: str) -> None:
    """A refusal for bytes in flight is `Busy`: the client retries the same put after a
    growing pause, and it lands once the node has room again."""
    keys = block_keys(np.arange(2 * 16), 16, f"busy/{transport}".encode())
    block = np.full(MiB, 3, np.uint8)
    flags = ("--host-capacity", "64MiB", "--max-inflight-bytes", "1MiB")
    with (
        running_daemon(*flags, "--metrics-address", "127.0.0.1:0") as d,
        d.client(transport=transport, timeout=30) as c,
        raw_channel(d.address) as slow,
    ):
        send_request(slow, PUT, pb.BlockHeaders(blocks=[
            pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=MiB))]))  # fmt: skip
        assert read_answer(slow).flags & READY  # 1 MiB in flight: the node's bound
        done: list[object] = []
        putter = threading.Thread(target=lambda: done.append(c.put(keys[1:], [block])))
        putter.start()
        poll(lambda: scrape(d)["kvstore_busy_refusals_total", ()] >= 1)  # refused, retrying
        slow.sendall(block.tobytes())
        assert pb.PutReply.FromString(read_answer(slow).meta).stored == 1
        putter.join(timeout=30)
        assert [r.stored for r in done] == [1]
        assert [bytes(b) for b in c.get(keys)] == [block.tobytes()] * 2


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_a_get_that_finds_dram_full_of_pins_is_retried(tmp_path, transport: str) -> None:
    """A block on disk with no room in DRAM to bring it up (every slot leased) is asked for
    again after a pause, and served once the lease ends."""
    keys = block_keys(np.arange(16 * 16), 16, f"pinned/{transport}".encode())
    blocks = [np.full(MiB, i, np.uint8) for i in range(16)]
    flags = ("--host-capacity", "8MiB", "--disk-dir", str(tmp_path), "--metrics-address")
    with (
        running_daemon(*flags, "127.0.0.1:0") as d,
        d.client(timeout=30) as holder,
        d.client(transport=transport, timeout=30) as reader,
    ):
        for key, block in zip(keys, blocks, strict=True):
            holder.put([key], [block], durable=True)  # on disk, whatever DRAM evicts
        lease = holder.lease(keys[::-1])  # pins what DRAM holds, and brings up what fits
        held = {bytes(k) for k in keys[::-1][: len(lease.blocks)]}
        assert lease.truncated and len(held) < 16
        outside = next(k for k in keys if bytes(k) not in held)
        got: list[np.ndarray] = []
        getter = threading.Thread(target=lambda: got.extend(reader.get([outside])))
        getter.start()
        poll(lambda: scrape(d)["kvstore_busy_refusals_total", ()] >= 1)  # asked, refused
        lease.release()
        getter.join(timeout=30)
        assert [bytes(g) for g in got] == [blocks[keys.index(outside)].tobytes()]
