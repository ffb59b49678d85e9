"""Daemon configuration: one frozen dataclass, validated once.

Each field is filled, in this order of precedence, from a command-line flag,
an environment variable `KVSTORE_<FIELD>` (e.g. `KVSTORE_HOST_CAPACITY=8GiB`),
the `--config` TOML file, or the default below. Field metadata carries the
flag's help, so `--help` and this file never disagree.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvstore.tiers.disk import FSYNC_POLICIES

MIN_RATE = 32 << 20  # bytes per second a transfer must average (--min-rate)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in `text`: `4GiB`, `512MiB`, `64k`, `1048576`. K, M, G, T are powers of 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 4GiB, 512MiB, 65536)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


def _default_host_capacity() -> int:
    """2 GiB, or a quarter of this machine's memory if that is less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return min(2 << 30, ram // 4)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
        raise ValueError(f"not a boolean: {text!r} (use true or false)")
    return value in {"1", "true", "yes", "on"}


def _opt(default: Any, help: str, parse: Any = None, **kw: Any) -> Any:
    meta = {"help": help, "parse": parse}
    if callable(default):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: str = _opt("127.0.0.1:7600", "HOST:PORT to serve gRPC on; port 0 picks a free one")
    host_capacity: int = _opt(
        _default_host_capacity,
        "bytes of host DRAM for blocks, preallocated at start (e.g. 4GiB)",
        parse_size,
    )
    data_address: str = _opt(
        "auto",
        "HOST:PORT of the raw TCP data plane; auto: the gRPC host, a free port; off: none",
    )
    ticket_ttl: float = _opt(
        30.0,
        "seconds a data-plane ticket stays valid, and a shared-memory lease or reservation "
        "lasts without being renewed (clients renew theirs while they live)",
        float,
    )
    data_timeout: float = _opt(
        30.0, "seconds a data connection may stall before its transfer is dropped", float
    )
    min_rate: int = _opt(
        MIN_RATE,
        "bytes per second a transfer must average: a slower one is dropped once it is "
        "--data-timeout behind, and what it reserved is freed",
        parse_size,
    )
    data_workers: int = _opt(16, "threads serving data-plane requests", int)
    nixl: str = _opt(
        "auto",
        "move payloads through NIXL too (RDMA, EFA, GPU memory; DATAPLANE.md): on, off, or "
        "auto (on where NIXL is installed, off with --tls-cert: NIXL traffic is not encrypted)",
    )
    max_connections: int = _opt(1024, "data-plane connections served at once", int)
    max_host_connections: int = _opt(256, "data-plane connections from one host", int)
    push_allow: str = _opt(
        "",
        "hosts and networks (CIDR) this node may push blocks to besides the nodes of its "
        "cluster, comma-separated; every target must prove the cluster's secret; empty: the "
        "cluster's nodes only (none without a cluster)",
    )
    chunk_size: int = _opt(1 << 20, "bytes per data frame when streaming blocks out", parse_size)
    max_block_size: int = _opt(256 << 20, "largest block a client may put", parse_size)
    reserve_timeout: float = _opt(
        30.0, "seconds a put waits for space when every block is pinned", float
    )
    workers: int = _opt(32, "concurrent RPCs served (threads)", int)
    prefault: bool = _opt(
        True, "touch the host arena at start so first puts run at full speed", parse_bool
    )
    disk_dir: str = _opt("", "directory of the disk tier's segment files; empty: no disk tier")
    disk_capacity: int = _opt(
        0, "bytes of disk for blocks; 0: 80% of the free space of --disk-dir at start", parse_size
    )
    segment_size: int = _opt(256 << 20, "bytes per disk segment file", parse_size)
    fsync: str = _opt(
        "batch",
        "when disk writes are synced: batch (each demotion batch), interval (every second) "
        "or never (left to the OS)",
    )
    dirty_ratio: float = _opt(
        0.5,
        "fraction of the host tier that may hold blocks not yet on disk before the oldest are "
        "written down; 0 writes every block down at once",
        float,
    )
    device_capacity: int = _opt(
        0,
        "bytes of accelerator memory for blocks, above the host tier; 0: none. Needs torch "
        "and the device; without them the daemon warns and runs without this tier",
        parse_size,
    )
    device: str = _opt("cuda", "torch device of the device tier: cuda, cuda:N (cpu: for tests)")
    promote: bool = _opt(True, "keep blocks read from disk in the host tier", parse_bool)
    persist_on_shutdown: bool = _opt(
        False, "on SIGTERM/SIGINT, write every host block to disk before exiting", parse_bool
    )
    cluster: str = _opt(
        "",
        "Redis URL of the cluster's location index (redis://HOST:PORT/DB, rediss://, "
        "redis+cluster://); empty: this node alone. A Redis that does not answer at start "
        "is waited for in the background while the node serves local-only",
    )
    cluster_secret: str = _opt(
        "",
        "file of the secret the cluster's nodes and routers share (one a line, at least 32 "
        "characters; the first in use, all accepted), reloaded on SIGHUP: nodes prove who "
        "they are to each other with it and sign their records in Redis. Required with "
        "--cluster, and for pushes",
    )
    node_id: str = _opt("", "the node's id in the cluster; empty: kept in --disk-dir, or new")
    advertise: str = _opt(
        "",
        "host other nodes and routers reach this node at; empty: the bound host, or this "
        "machine's name when bound to every interface",
    )
    heartbeat: float = _opt(1.0, "seconds between the node's heartbeats to the index", float)
    node_ttl: float = _opt(
        5.0, "seconds after its last heartbeat that a node drops out of every answer", float
    )
    events_address: str = _opt(
        "", "ZMQ endpoint to publish KV events on (vLLM's format), e.g. tcp://*:5557; empty: none"
    )
    events_replay: str = _opt("", "ZMQ endpoint serving replays of missed events; empty: none")
    events_topic: str = _opt("", "topic of every published KV event batch")
    auth_file: str = _opt(
        "",
        "TOML file of tenants (a secret, then [[tenant]] name, token, quota, read_only, shm, "
        "push, admin), reloaded on SIGHUP; empty: no authentication (then bind loopback only)",
    )
    tls_cert: str = _opt("", "PEM certificate chain: serve gRPC and the TCP data plane over TLS")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt(
        "", "PEM CA bundle: clients must present a certificate it signed (mutual TLS)"
    )
    metrics_address: str = _opt("", "HOST:PORT serving Prometheus metrics at /metrics; empty: none")
    metrics_tenants: bool = _opt(
        False,
        "add per-tenant series (kvstore_tenant_*: each tenant's name, bytes, quota and hits) "
        "to /metrics, which takes no token: for a metrics address only operators reach",
        parse_bool,
    )
    drain_timeout: float = _opt(
        30.0,
        "seconds SIGTERM lets transfers in flight finish (new ones are refused) before exiting",
        float,
    )
    max_inflight_bytes: int = _opt(
        0,
        "bytes of puts and gets in flight over the whole node; more are refused with "
        "Busy (clients retry); 0: the host tier's capacity",
        parse_size,
    )
    max_connection_bytes: int = _opt(
        0,
        "bytes in flight on one connection; a request past it is refused with "
        "RESOURCE_EXHAUSTED (split the batch); 0: no bound but the node's",
        parse_size,
    )
    log_level: str = _opt("info", "debug, info, warning or error")

    def __post_init__(self) -> None:
        if not _host_port(self.address):
            raise ValueError(f"address: expected HOST:PORT, got {self.address!r}")
        if self.cluster and not self.cluster_secret:
            raise ValueError(
                "cluster_secret: required with --cluster (a file of the secret every node and "
                "router of the cluster shares: nodes prove who they are with it)"
            )
        if self.metrics_address and not _host_port(self.metrics_address):
            raise ValueError(f"metrics_address: expected HOST:PORT, got {self.metrics_address!r}")
        if self.host_capacity < 1 << 20:
            raise ValueError(f"host_capacity: must be at least 1MiB, got {self.host_capacity}")
        if not 4096 <= self.chunk_size <= 64 << 20:
            raise ValueError(f"chunk_size: must be 4KiB..64MiB, got {self.chunk_size}")
        if self.data_address not in ("auto", "off") and not _host_port(self.data_address):
            raise ValueError(
                f"data_address: expected HOST:PORT, auto or off, got {self.data_address!r}"
            )
        if self.ticket_ttl < 0 or self.data_timeout <= 0:
            raise ValueError("ticket_ttl must be >= 0 and data_timeout > 0")
        if self.max_block_size < 1:
            raise ValueError(f"max_block_size: must be positive, got {self.max_block_size}")
        if self.reserve_timeout < 0:
            raise ValueError(f"reserve_timeout: must be >= 0, got {self.reserve_timeout}")
        if self.workers < 2:
            raise ValueError(f"workers: must be at least 2, got {self.workers}")
        for name in ("min_rate", "data_workers", "max_connections", "max_host_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.nixl not in ("auto", "on", "off"):
            raise ValueError(f"nixl: expected auto, on or off, got {self.nixl!r}")
        if self.nixl == "on" and self.data_address == "off":
            raise ValueError("nixl: on needs the data plane (--data-address)")
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(
                f"fsync: expected one of {', '.join(FSYNC_POLICIES)}, got {self.fsync!r}"
            )
        if not 0 <= self.dirty_ratio <= 1:
            raise ValueError(f"dirty_ratio: must be in 0..1, got {self.dirty_ratio}")
        if self.segment_size < 1 << 20:
            raise ValueError(f"segment_size: must be at least 1MiB, got {self.segment_size}")
        if not 0 < self.heartbeat < self.node_ttl:
            raise ValueError(
                f"heartbeat, node_ttl: need 0 < heartbeat < node_ttl, got {self.heartbeat} "
                f"and {self.node_ttl}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert, tls_key: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: needs tls_cert and tls_key")
        for name in ("auth_file", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path}")
        if self.drain_timeout < 0 or min(self.max_inflight_bytes, self.max_connection_bytes) < 0:
            raise ValueError("drain_timeout, max_inflight_bytes, max_connection_bytes: >= 0")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"log_level: unknown level {self.log_level!r}")

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, Any],
        environ: Mapping[str, str] = os.environ,
        file: Mapping[str, Any] | None = None,
    ) -> ServerConfig:
        """Flags (None = not given) over `KVSTORE_*` environment over the config file over
        defaults. Every value says where it came from when it is wrong."""
        values = {}
        for f in fields(cls):
            raw = flags.get(f.name)
            source = f"--{f.name.replace('_', '-')}"
            if raw is None:
                source = f"KVSTORE_{f.name.upper()}"
                raw = environ.get(source)
            if raw is None and file is not None and f.name in file:
                source, raw = "the config file", file[f.name]
            if raw is None:
                continue
            parse = f.metadata["parse"] or str
            try:
                values[f.name] = _typed(raw, parse)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{f.name} (from {source}): {exc}") from None
        return cls(**values)

    @classmethod
    def load_file(cls, path: str) -> dict[str, Any]:
        """A TOML file of the flags' names (dashes or underscores); unknown names are errors."""
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise ValueError(f"config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config: {path} is not TOML: {exc}") from None
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in names or name == "config":
                raise ValueError(f"{key} (from {path}): unknown setting")
            values[name] = value
        return values

    def shown(self) -> str:
        """Every setting as TOML, as `--print-config` shows it."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["parse"] is parse_size:
                value = format_size(value)
            lines.append(f"{f.name.replace('_', '-')} = {_toml(value)}")
        return "\n".join(lines) + "\n"


def _typed(raw: Any, parse: Any) -> Any:
    """A value from a flag, the environment (text) or TOML (typed), parsed for its field."""
    if isinstance(raw, bool) and parse is not parse_bool:
        raise TypeError(f"expected a {'number' if parse in (int, float) else 'string'}")
    if parse is str and not isinstance(raw, str):
        raise TypeError(f"expected a string, got {raw!r}")
    return parse(raw)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) <= 65535)
