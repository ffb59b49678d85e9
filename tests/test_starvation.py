"""Calls that may block never take the last FREE_THREADS RPC threads: with every blocking
slot held by idle Put streams, waiting lookups and a Watch, the next ones are refused at
once, and health, Stats and plain lookups still answer."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SERVICE, running_daemon
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.server.servicer import FREE_THREADS

WORKERS = 8
SLOTS = WORKERS - FREE_THREADS  # RPC threads calls that may block can take: 4
PUTS = 2  # idle Put streams
WAITERS = SLOTS - PUTS - 1  # lookups left waiting beside them and one Watch
EXTRA = 4  # waiting lookups more than the gate allows
ANSWER = 5.0  # seconds: a bound on hanging, not a speed assertion


def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the node never got there"
        threading.Event().wait(0.02)


def test_blocking_calls_never_take_the_threads_health_stats_and_lookups_need() -> None:
    release = threading.Event()

    def idle() -> Iterator[bytes]:
        release.wait()  # a producer that opened its stream and sends nothing yet
        yield from ()

    here = block_keys(np.arange(16), 16, b"starve/here")
    missing = block_keys(np.arange(16 * (WAITERS + EXTRA)), 16, b"starve/missing")
    with (
        # idle Put streams are dropped after --data-timeout: not during this test
        running_daemon("--workers", str(WORKERS), "--data-timeout", "600") as node,
        grpc.insecure_channel(node.address) as channel,
        node.client(transport="tcp", timeout=30) as producer,
        node.client(transport="grpc", timeout=ANSWER) as router,
    ):
        producer.put(here, [np.ones(64, np.uint8)])
        call = channel.unary_stream(f"/{SERVICE}/Watch")
        watch = call(pb.WatchRequest(from_sequence=0).SerializeToString(), timeout=120)
        next(watch)  # the node's first batch: the Watch holds its thread now
        put = channel.stream_unary(f"/{SERVICE}/Put")
        puts = [put.future(idle(), timeout=120) for _ in range(PUTS)]
        until(lambda: router.locate(here)[0].load.inflight == PUTS)  # both puts are in

        lookup = channel.unary_unary(f"/{SERVICE}/Lookup")
        ended: queue.Queue[grpc.Future] = queue.Queue()
        lookups = []
        for key in missing:  # nobody puts these until the end
            request = pb.LookupRequest(keys=pb.GetRequest(keys=[key], wait_ms=60_000))
            lookups.append(lookup.future(request.SerializeToString(), timeout=120))
            lookups[-1].add_done_callback(ended.put)
        try:
            refused = [ended.get(timeout=30) for _ in range(EXTRA)]
        except queue.Empty:
            raise AssertionError("waiting lookups past the bound took RPC threads") from None
        assert all(f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused)
        assert sum(not f.done() for f in lookups) == WAITERS

        # the gate is full: more of what may block is refused at once, not queued
        wait = pb.LookupRequest(keys=pb.GetRequest(keys=missing[:1], wait_ms=60_000))
        for attempt in (
            lambda: put(iter(()), timeout=ANSWER),
            lambda: next(call(pb.WatchRequest().SerializeToString(), timeout=ANSWER)),
            lambda: lookup(wait.SerializeToString(), timeout=ANSWER),
        ):
            try:
                attempt()
                raise AssertionError("a call that may block passed a full gate")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc

        # and what never blocks still answers
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=ANSWER
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert router.stats().tiers
        assert router.lookup(here) == 1
        assert router.lookup(here, wait=60) == 1  # a wait already met does not wait
        assert router.lookup(missing[:1]) == 0

        release.set()  # the producers end their streams (empty: refused as such) ...
        assert [f.code() for f in puts] == [grpc.StatusCode.INVALID_ARGUMENT] * PUTS
        producer.put(missing, [np.ones(64, np.uint8)] * len(missing))  # ... the keys arrive
        waiting = [f for f in lookups if f not in refused]
        assert [pb.LookupReply.FromString(f.result()).found for f in waiting] == [1] * WAITERS
        watch.cancel()
