"""Prometheus metrics at `http://--metrics-address/metrics`, names prefixed `kvstore_`.

What the node counts anyway (tiers, transfers, connections, tickets, and tenants with
--metrics-tenants) is read when Prometheus scrapes, so serving pays nothing for it; only
RPC latencies are observed as calls end, by a gRPC interceptor. Rates (GB/s by path, hits
per second) are PromQL's `rate()` over these counters. The endpoint takes no token."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvstore.server.main import Daemon

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
TIER_COUNTERS = ("hits", "misses", "evictions", "demotions", "promotions", "errors")


class Metrics:
    """The node's registry; `interceptor` times RPCs, `serve` starts the HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "kvstore_rpc_duration_seconds",
            "RPC time from call to last reply message, by method and status code",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch(self, daemon: Daemon) -> None:
        self.registry.register(_NodeCollector(daemon))

    def serve(self, address: str) -> tuple[str, Callable[[], None]]:
        """Serve /metrics on `address` (HOST:PORT; port 0 picks one): the address bound,
        and how to stop."""
        host, _, port = address.rpartition(":")
        server, thread = start_http_server(int(port), host.strip("[]"), self.registry)
        bound = f"{host}:{server.server_port}"

        def stop() -> None:
            server.shutdown()
            thread.join(timeout=5)

        return bound, stop

    def interceptor(self) -> grpc.ServerInterceptor:
        return _Timing(self.rpc_seconds)


class _Timing(grpc.ServerInterceptor):
    def __init__(self, seconds: Histogram) -> None:
        self._seconds = seconds

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rpartition("/")[2]
        observe = self._seconds.labels
        if handler.unary_unary:
            return handler._replace(unary_unary=_timed(handler.unary_unary, method, observe))
        if handler.stream_unary:
            return handler._replace(stream_unary=_timed(handler.stream_unary, method, observe))
        if handler.unary_stream:
            return handler._replace(unary_stream=_streamed(handler.unary_stream, method, observe))
        return handler._replace(stream_stream=_streamed(handler.stream_stream, method, observe))


def _code(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()  # set by abort() or set_code(); None: the handler's return
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _timed(behaviour: Callable, method: str, observe: Callable) -> Callable:
    def timed(request: Any, context: grpc.ServicerContext) -> Any:
        start, failed = time.perf_counter(), True
        try:
            reply = behaviour(request, context)
            failed = False
            return reply
        finally:
            observe(method, _code(context, failed)).observe(time.perf_counter() - start)

    return timed


def _streamed(behaviour: Callable, method: str, observe: Callable) -> Callable:
    def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start, failed = time.perf_counter(), True
        try:
            yield from behaviour(request, context)
            failed = False
        finally:
            observe(method, _code(context, failed)).observe(time.perf_counter() - start)

    return streamed


class _NodeCollector(Collector):
    """Reads the node's own counts at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        d = self.daemon
        stats = d.store.stats()
        tier = ["tier"]
        gauges = {
            name: GaugeMetricFamily(f"kvstore_tier_{name}", text, labels=tier)
            for name, text in (
                ("blocks", "blocks held"),
                ("bytes", "bytes of capacity the blocks take"),
                ("payload_bytes", "bytes of the payloads as stored (encoded)"),
                ("capacity_bytes", "the tier's capacity"),
            )
        }
        counters = {
            name: CounterMetricFamily(
                f"kvstore_tier_{name}", f"{name} in the tier, in blocks", labels=tier
            )
            for name in TIER_COUNTERS
        }
        for t in stats.tiers:
            gauges["blocks"].add_metric([t.name], t.blocks)
            gauges["bytes"].add_metric([t.name], t.bytes)
            gauges["payload_bytes"].add_metric([t.name], t.payload_bytes)
            gauges["capacity_bytes"].add_metric([t.name], t.capacity)
            for name in TIER_COUNTERS:
                counters[name].add_metric([t.name], getattr(t, name))
        yield from gauges.values()
        yield from counters.values()
        for name in ("puts", "gets", "lookups"):
            yield CounterMetricFamily(f"kvstore_{name}", f"{name} served", getattr(stats, name))
        yield from _transfers(d)
        yield from _tenants(d)
        yield GaugeMetricFamily(
            "kvstore_data_connections",
            "data-plane connections open (TCP and Unix socket)",
            d.channel.connection_count() if d.channel else 0,
        )
        yield GaugeMetricFamily(
            "kvstore_tickets_outstanding",
            "data-plane tickets issued and not yet redeemed or expired",
            d.tickets.outstanding(),
        )
        yield GaugeMetricFamily(
            "kvstore_inflight_transfers", "transfers running", d.transfers.inflight
        )
        yield GaugeMetricFamily(
            "kvstore_inflight_bytes", "payload bytes in flight", d.transfers.inflight_bytes
        )
        yield CounterMetricFamily(
            "kvstore_busy_refusals",
            "requests refused as busy (out of room, threads or bandwidth for now: retried)",
            d.transfers.busy,
        )
        yield GaugeMetricFamily(
            "kvstore_draining", "1 while the node drains to stop", int(d.transfers.draining)
        )
        fetched = CounterMetricFamily(
            "kvstore_fetched_blocks", "blocks pulled from other nodes", labels=["node"]
        )
        fetched_bytes = CounterMetricFamily(
            "kvstore_fetched_bytes", "bytes pulled from other nodes", labels=["node"]
        )
        for node, n in stats.fetched_blocks.items():
            fetched.add_metric([node], n)
            fetched_bytes.add_metric([node], stats.fetched_bytes.get(node, 0))
        yield fetched
        yield fetched_bytes


def _transfers(d: Daemon) -> Iterator[CounterMetricFamily]:
    labels = ["direction", "path"]
    count = CounterMetricFamily("kvstore_transfers", "transfers done", labels=labels)
    moved = CounterMetricFamily("kvstore_transfer_bytes", "payload bytes moved", labels=labels)
    for name, n in d.transfers.snapshot().items():
        count.add_metric(name.split("/", 1), n)
    for name, n in d.transfers.bytes_by_path().items():
        moved.add_metric(name.split("/", 1), n)
    yield count
    yield moved


def _tenants(d: Daemon) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Per tenant ("" without an auth file): what it holds, its quota, its gets' hits.
    Only with --metrics-tenants: /metrics takes no token, and these name every tenant."""
    if not d.config.metrics_tenants:
        return
    label = ["tenant"]
    blocks = GaugeMetricFamily("kvstore_tenant_blocks", "blocks the tenant holds", labels=label)
    held = GaugeMetricFamily("kvstore_tenant_bytes", "bytes the tenant holds", labels=label)
    quota = GaugeMetricFamily(
        "kvstore_tenant_quota_bytes", "the tenant's quota; 0: none", labels=label
    )
    evicted = CounterMetricFamily(
        "kvstore_tenant_quota_evictions", "the tenant's blocks deleted past its quota", labels=label
    )
    hits = CounterMetricFamily(
        "kvstore_tenant_hits", "blocks gets asked for and were served", labels=label
    )
    misses = CounterMetricFamily(
        "kvstore_tenant_misses", "blocks gets asked for and missed", labels=label
    )
    auth = d.auth
    if auth.quotas is not None:
        for name, (n, nbytes) in auth.quotas.all_usage().items():
            blocks.add_metric([name], n)
            held.add_metric([name], nbytes)
        for name, n in auth.quotas.evicted.copy().items():
            evicted.add_metric([name], n)
    for tenant in auth.tenants or ():
        quota.add_metric([tenant.name], tenant.quota)
    for name, (asked, served) in auth.reads.copy().items():
        hits.add_metric([name], served)
        misses.add_metric([name], asked - served)
    yield from (blocks, held, quota, evicted, hits, misses)
