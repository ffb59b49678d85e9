"""kvstore-server: the daemon's entry point."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore import __version__
from kvstore.config import ServerConfig, format_size, parse_bool, parse_size
from kvstore.errors import Unsupported
from kvstore.limits import MAX_HEADER_FRAME, MAX_TOKENS
from kvstore.server import tls
from kvstore.server.auth import Auth
from kvstore.server.channel import ChannelServer
from kvstore.server.cluster import Membership, check_cluster_url, node_id
from kvstore.server.fetch import Fetcher
from kvstore.server.metrics import Metrics
from kvstore.server.nixl import NixlNode
from kvstore.server.policy import RequestPolicy
from kvstore.server.preauth import PreAuth, token_check
from kvstore.server.servicer import SERVICE, KVStoreServicer
from kvstore.server.status import TransferCounts
from kvstore.server.tickets import TicketBook
from kvstore.store import Store
from kvstore.tiers.device import DeviceTier, device_available
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.trust import ClusterSecret

log = logging.getLogger("kvstore.server")

MAX_MESSAGE = 256 << 20  # what the node may send (it sends frames of --chunk-size or less)
# The largest request a legitimate caller sends is a Put data frame: at most one chunk,
# and chunks are at most 64 MiB (--chunk-size, which nodes push to each other with, and
# kvstore-bench --chunk stop there; Client's default is 1 MiB). Header frames are refused
# past MAX_HEADER_FRAME (4 MiB), a lookup of MAX_TOKENS token ids is at most 5 MiB, every
# other request is smaller. The margin covers a frame's tag and length. Callers without a
# known token are refused before their request is read at all (server/preauth.py).
MAX_CHUNK = 64 << 20
MAX_RECEIVE = max(MAX_CHUNK, MAX_HEADER_FRAME, 5 * MAX_TOKENS) + (64 << 10)


class Daemon:
    """A running node: its store, its gRPC server and the address it bound."""

    def __init__(self, config: ServerConfig) -> None:
        """Claim the disk directory, build the tiers, bind every port; anything that fails
        undoes what came before it and raises, so a start-up failure never lingers."""
        self.config = config
        check_cluster_url(config.cluster)
        self.store = _store(config)  # the disk tier locks its directory first
        self.channel: ChannelServer | None = None
        self.membership: Membership | None = None
        self.fetcher: Fetcher | None = None
        self.metrics = Metrics()
        self.metrics_address = ""
        self._stop_metrics: Callable[[], None] | None = None
        try:
            self._serve(config)
        except BaseException:
            self._close()
            raise

    def _serve(self, config: ServerConfig) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(config.workers, thread_name_prefix="kvstore-rpc"),
            interceptors=[
                self.metrics.interceptor(),  # first: it counts the refusals below too
                PreAuth(
                    token_check(lambda metadata: self.auth.caller(metadata))
                ),  # no token: refused unread
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        host_name, _, _ = config.address.rpartition(":")
        self.instance = os.urandom(16)
        cluster = ClusterSecret.read(config.cluster_secret) if config.cluster_secret else None
        self.auth = Auth(config.auth_file, self.store, cluster, self.instance.hex())
        if not self.auth.on and not _loopback(host_name):
            log.warning(
                "listening on %s without --auth-file: anyone who reaches it can read, "
                "overwrite and delete every block",
                config.address,
            )
        _warn_exposed(config)
        credentials = tls.grpc_credentials(config)
        try:
            if credentials is None:
                port = self.server.add_insecure_port(config.address)
            else:
                port = self.server.add_secure_port(config.address, credentials)
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"cannot listen on {config.address}: {exc}") from None
        self.address = f"{host_name}:{port}"
        self.tickets = TicketBook(config.ticket_ttl)
        self.auth.revoked.append(self.tickets.revoke)
        self.transfers = TransferCounts(
            config.max_inflight_bytes or self.store.host.capacity, config.max_connection_bytes
        )
        self.policy = RequestPolicy(self.store, self.auth, self.transfers, self.tickets)
        self.node_id = node_id(config.node_id, config.disk_dir)
        self.nixl = _nixl(config, self.store, f"kvstore-node-{self.node_id}-{self.instance.hex()}")
        if config.data_address != "off":
            data_address = config.data_address
            if data_address == "auto":
                data_address = f"{host_name}:0"
            try:
                self.channel = ChannelServer(
                    self.policy,
                    instance=self.instance,
                    tls=tls.data_context(config),
                    tcp_address=data_address,
                    unix=True,
                    timeout=config.data_timeout,
                    min_rate=config.min_rate,
                    lease_ttl=config.ticket_ttl,
                    workers=config.data_workers,
                    max_connections=config.max_connections,
                    max_per_host=config.max_host_connections,
                    nixl=self.nixl,
                )
            except OSError as exc:
                raise OSError(f"cannot listen on {data_address}: {exc.strerror or exc}") from None
            self.auth.revoked.append(self.channel.revoke)
        advertised = _advertised(config.advertise, self.address)
        data = _advertised(config.advertise, self.channel.address) if self.channel else ""
        self.membership = Membership(
            self.store,
            node_id=self.node_id,
            address=advertised,
            data_address=data,
            cluster=config.cluster,
            heartbeat=config.heartbeat,
            node_ttl=config.node_ttl,
            events_address=config.events_address,
            events_replay=config.events_replay,
            events_topic=config.events_topic,
            transfers=self.transfers,
            cluster_secret=cluster,
        )
        self.fetcher = Fetcher(
            self.store,
            self.membership,
            config.data_timeout,
            tls.peer_options(config) | {"cluster_secret": cluster},
            nixl=self.nixl is not None,
        )
        self.policy.fetcher = self.fetcher
        servicer = KVStoreServicer(
            self.policy,
            config.chunk_size,
            self.tickets,
            membership=self.membership,
            fetcher=self.fetcher,
            instance=self.instance.hex(),
            workers=config.workers,
            push_allow=config.push_allow,
            info=lambda: (
                self.channel.address if self.channel else "",
                self.channel.unix_address if self.channel else "",
            ),
            nixl=self.nixl is not None,
            dialable=_dialable(self.address, advertised),
            min_rate=config.min_rate,
        )
        self.server.add_generic_rpc_handlers([servicer.handler()])
        self.metrics.watch(self)
        if config.metrics_address:
            try:
                self.metrics_address, self._stop_metrics = self.metrics.serve(
                    config.metrics_address
                )
            except OSError as exc:
                raise OSError(f"cannot listen on {config.metrics_address}: {exc}") from None

    def start(self) -> Daemon:
        if self.channel:
            self.channel.start()
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def drain(self, timeout: float) -> int:
        """Refuse new transfers (UNAVAILABLE: retry elsewhere), report NOT_SERVING, leave the
        cluster's answers, and let transfers in flight finish for up to `timeout` seconds.
        Returns how many were still running then."""
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.transfers.draining = True
        if self.membership:
            self.membership.leave()
        deadline = time.monotonic() + timeout
        while self.transfers.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.transfers.inflight

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new RPCs, let running ones finish for up to `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._close(persist=self.config.persist_on_shutdown)

    def _close(self, persist: bool = False) -> None:
        if self._stop_metrics:
            self._stop_metrics()
        if self.channel:
            self.channel.stop()
        if self.fetcher:
            self.fetcher.close()
        if self.membership:
            self.membership.close()  # leaves the cluster's answers at once
        self.store.close(persist=persist)


def _store(config: ServerConfig) -> Store:
    disk = None
    if config.disk_dir:
        capacity = config.disk_capacity or _free_space(config.disk_dir) * 4 // 5
        disk = DiskTier(
            config.disk_dir, capacity, segment_size=config.segment_size, fsync=config.fsync
        )
    try:
        host = HostTier(config.host_capacity, prefault=config.prefault, write_back=bool(disk))
        device = None
        if config.device_capacity and device_available(config.device):
            device = DeviceTier(config.device_capacity, config.device)
            device.register_host(host.arena.memory)
        elif config.device_capacity:
            log.warning(
                "no %s device here (or no torch): running without a device tier", config.device
            )
    except BaseException:
        if disk is not None:
            disk.close()
        raise
    return Store(
        [tier for tier in (device, host, disk) if tier is not None],
        max_block_size=config.max_block_size,
        reserve_timeout=config.reserve_timeout,
        dirty_ratio=config.dirty_ratio,
        promote=config.promote,
    )


def _advertised(advertise: str, bound: str) -> str:
    """HOST:PORT others reach a listener at: the advertised host, else the bound one, else
    (bound to every interface) this machine's name."""
    host, _, port = bound.rpartition(":")
    if advertise:
        host = advertise
    elif host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def _dialable(bound: str, advertised: str) -> frozenset[str]:
    """The HOST:PORT strings under which a caller reaches this node's gRPC and no other
    process: the bound and advertised addresses, and, bound to every interface, loopback
    with its port (which the wildcard bind holds)."""
    host, _, port = bound.rpartition(":")
    names = {bound, advertised}
    if host.strip("[]") == "0.0.0.0":
        names.add(f"127.0.0.1:{port}")
    elif host.strip("[]") == "::":
        names.add(f"[::1]:{port}")
    return frozenset(names)


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _nixl(config: ServerConfig, store: Store, name: str) -> NixlNode | None:
    """The node's NIXL agent, or None, saying at start which and why."""
    if config.nixl == "off" or config.data_address == "off":
        log.info("NIXL off (--nixl off, or no data plane)")
        return None
    if config.nixl == "auto" and config.tls_cert:
        log.info(
            "NIXL off: its traffic is not encrypted and TLS is on (--nixl on for a trusted fabric)"
        )
        return None
    try:
        node = NixlNode(store, name)
    except Unsupported as exc:
        if config.nixl == "on":
            raise
        log.info("NIXL off: %s", exc)
        return None
    log.info("NIXL on: agent %s, the host arena registered", name)
    return node


def _warn_exposed(config: ServerConfig) -> None:
    """Warn of the endpoints that take no token when others may reach them."""
    if config.metrics_address and not _loopback(config.metrics_address.rpartition(":")[0]):
        log.warning(
            "metrics on %s take no token: anyone who reaches it sees the node's counts%s; "
            "bind loopback or let only Prometheus reach it",
            config.metrics_address,
            " and every tenant's name, bytes, quota and hits (--metrics-tenants)"
            if config.metrics_tenants
            else "",
        )
    events = []
    if address := config.events_address:  # without it there is no replay endpoint either
        if _exposed(address, bound="*" in address or "::" in address):  # as the publisher
            events.append(address)
        if _exposed(config.events_replay, bound=True):
            events.append(config.events_replay)
    if events:
        log.warning(
            "KV events on %s take no token: anyone who reaches them sees every tenant's node "
            "keys as blocks come and go (the keys are a one-way mapping no tenant can use, "
            "but their count and timing leak); bind loopback or let only routers reach them",
            " and ".join(events),
        )


def _exposed(endpoint: str, bound: bool) -> bool:
    """A ZMQ endpoint others may reach: TCP on every interface, or bound to a host not
    loopback (ipc:// and inproc:// stay on this machine)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return host in ("*", "0.0.0.0", "::", "") or (bound and not _loopback(host))


def _free_space(directory: str) -> int:
    os.makedirs(directory, exist_ok=True)
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvstore-server",
        description="KV-cache block store for disaggregated LLM inference. Every flag can also "
        "be set as the environment variable KVSTORE_<FLAG> (e.g. KVSTORE_HOST_CAPACITY); "
        "a flag wins over the environment, which wins over --config FILE, which wins over the "
        "default.",
    )
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        if f.metadata["parse"] is parse_size:
            default = format_size(default)
        switch = f.metadata["parse"] is parse_bool  # a bare --flag means true
        ap.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"),
            nargs="?" if switch else None,
            const="true" if switch else None,
        )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of these settings (names as the flags); flags and KVSTORE_* "
        "variables win over it",
    )
    ap.add_argument(
        "--print-config", action="store_true", help="print the settings in effect, and exit"
    )
    ap.add_argument("--version", action="version", version=f"kvstore {__version__}")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        file = ServerConfig.load_file(args.config) if args.config else None
        config = ServerConfig.resolve(vars(args), os.environ, file)
    except ValueError as exc:
        parser().error(str(exc))
    if args.print_config:
        print(config.shown(), end="")
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        daemon = Daemon(config).start()
    except (OSError, ValueError) as exc:  # a port or directory in use, a bad device, ...
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, lambda *_: daemon.auth.reload())
    tiers = ", ".join(f"{t.name} tier {format_size(t.capacity)}" for t in daemon.store.tiers)
    print(
        f"kvstore-server {__version__} listening on {daemon.address} (data plane "
        f"{daemon.channel.address if daemon.channel else 'off'}"
        f"{' with NIXL' if daemon.nixl else ''}, {tiers}"
        + (
            f", metrics http://{daemon.metrics_address}/metrics)" if daemon.metrics_address else ")"
        ),
        flush=True,
    )
    while not stopping.wait(0.5):  # Python runs signal handlers only between the main
        pass  # thread's bytecodes: a wait without timeout could sleep through a SIGTERM
    log.info("draining: new transfers refused, %gs for those in flight", config.drain_timeout)
    left = daemon.drain(config.drain_timeout)
    if left:
        log.warning("%d transfers still running at the end of the drain: cut", left)
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
