"""Prometheus metrics (`--metrics-address`): what an operator scrapes matches what the
node did, per tier, tenant, path and RPC method; and draining shows in health and metrics."""

from __future__ import annotations

import re
import signal
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_cluster_index import poll

from conftest import SERVICE, Daemon, running_daemon
from kvstore.errors import Unavailable
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb

MiB = 1 << 20
AUTH = """
secret = "a-secret-of-at-least-32-characters-0123456789"

[[tenant]]
name = "alice"
token = "alice-token-0123456789"

[[tenant]]
name = "bob"
token = "bob-token-0123456789"
quota = "2MiB"
"""


def scrape(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the node exposes, by name and labels."""
    address = re.search(r"metrics http://(\S+)/metrics", d.banner).group(1)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def metered(tmp_path) -> Iterator[Daemon]:
    auth = tmp_path / "tenants.toml"
    auth.write_text(AUTH)
    with running_daemon(
        "--host-capacity", "16MiB", "--metrics-address", "127.0.0.1:0",
        "--auth-file", str(auth), "--metrics-tenants",
    ) as d:  # fmt: skip
        yield d


def test_metrics_count_what_the_node_did(metered) -> None:
    keys = block_keys(np.arange(4 * 16), 16, b"metrics")
    blocks = [np.full(MiB, i, np.uint8) for i in range(4)]
    with (
        metered.client(token="alice-token-0123456789", transport="tcp", timeout=30) as alice,
        metered.client(token="bob-token-0123456789", transport="grpc", timeout=30) as bob,
    ):
        alice.put(keys, blocks)
        assert len(alice.get([*keys[:3], bytes(16)])) == 3  # three hits, then a miss
        bob.put(keys[:2], blocks[:2])
        bob.put(keys[2:3], blocks[2:3])  # 3 MiB on a 2 MiB quota: his oldest goes
        seen = scrape(metered)
        assert seen["kvstore_data_connections", ()] >= 1  # alice's, open
    assert seen["kvstore_tier_blocks", (("tier", "host"),)] == 4 + 2
    assert seen["kvstore_tier_capacity_bytes", (("tier", "host"),)] == 16 * MiB
    assert seen["kvstore_transfer_bytes_total", (("direction", "put"), ("path", "tcp"))] == 4 * MiB
    assert seen["kvstore_transfer_bytes_total", (("direction", "get"), ("path", "tcp"))] == 3 * MiB
    assert seen["kvstore_transfers_total", (("direction", "put"), ("path", "grpc"))] == 2
    alice_ = (("tenant", "alice"),)
    bob_ = (("tenant", "bob"),)
    assert (
        seen["kvstore_tenant_hits_total", alice_],
        seen["kvstore_tenant_misses_total", alice_],
    ) == (3, 1)
    assert seen["kvstore_tenant_blocks", alice_] == 4
    assert seen["kvstore_tenant_bytes", bob_] == 2 * MiB
    assert seen["kvstore_tenant_quota_bytes", bob_] == 2 * MiB
    assert seen["kvstore_tenant_quota_evictions_total", bob_] == 1
    hello = ("kvstore_rpc_duration_seconds_count", (("code", "OK"), ("method", "Hello")))
    assert seen[hello] >= 1
    assert seen["kvstore_tickets_outstanding", ()] >= 0
    assert seen["kvstore_draining", ()] == 0


@pytest.mark.parametrize("shown", [False, True])
def test_tenants_show_only_with_metrics_tenants(tmp_path, shown: bool) -> None:
    """/metrics takes no token: without --metrics-tenants no series names a tenant."""
    auth = tmp_path / "tenants.toml"
    auth.write_text(AUTH)
    flags = ["--host-capacity", "16MiB", "--metrics-address", "127.0.0.1:0"]
    flags += ["--auth-file", str(auth)] + (["--metrics-tenants"] if shown else [])
    keys = block_keys(np.arange(16), 16, b"names")
    with running_daemon(*flags) as d:
        for token in ("alice-token-0123456789", "bob-token-0123456789"):
            with d.client(token=token, transport="grpc", timeout=30) as c:
                c.put(keys, [np.ones(4096, np.uint8)])
                c.get(keys)
        address = re.search(r"metrics http://(\S+)/metrics", d.banner).group(1)
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    assert "kvstore_tier_blocks" in text and "kvstore_puts_total 2.0" in text
    assert ("alice" in text, "bob" in text, "kvstore_tenant_" in text) == (shown,) * 3


def test_refused_calls_are_counted_by_code(metered) -> None:
    with grpc.insecure_channel(metered.address) as channel:
        stats = channel.unary_unary(f"/{SERVICE}/Stats")
        with pytest.raises(grpc.RpcError):
            stats(pb.StatsRequest().SerializeToString())  # no token
    seen = scrape(metered)
    assert (
        seen[
            "kvstore_rpc_duration_seconds_count", (("code", "UNAUTHENTICATED"), ("method", "Stats"))
        ]
        == 1
    )


def test_a_draining_node_is_not_serving_and_clients_retry_elsewhere(tmp_path) -> None:
    """While a put holds the drain open, health says NOT_SERVING, the metrics say draining,
    and a client's get is refused once: a stream, gRPC's policy does not retry it (a node
    that dies under a get must not hold it past its deadline)."""
    release = threading.Event()
    started = threading.Event()

    def stalled_put() -> Iterator[bytes]:
        started.set()
        release.wait(60)
        yield pb.PutRequest().SerializeToString()

    flags = ("--host-capacity", "8MiB", "--metrics-address", "127.0.0.1:0", "--drain-timeout", "60")
    with (
        running_daemon(*flags) as d,
        grpc.insecure_channel(d.address) as channel,
        d.client(transport="grpc", timeout=30) as c,
    ):
        c.stats()
        put = channel.stream_unary(f"/{SERVICE}/Put").future(stalled_put(), timeout=60)
        started.wait(10)
        poll(lambda: scrape(d)["kvstore_inflight_transfers", ()] == 1)
        d.process.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)
        poll(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest()).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
        )
        assert scrape(d)["kvstore_draining", ()] == 1
        with pytest.raises(Unavailable, match="shutting down"):
            c.get(block_keys(np.arange(16), 16, b"drain"))
        refused = (
            "kvstore_rpc_duration_seconds_count",
            (("code", "UNAVAILABLE"), ("method", "Get")),
        )
        assert scrape(d)[refused] == 1
        release.set()
        put.exception(30)
