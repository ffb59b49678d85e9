"""What the sync and async clients share that does no I/O: settings, the codec pool,
the data-plane connections, and the choice of transfer path."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from kvstore import codecs
from kvstore.client._wire import Encoding
from kvstore.client.dataplane import DataConnections
from kvstore.errors import InvalidArgument, ResourceExhausted, Unavailable, Unsupported
from kvstore.tiers.host import HostTier

DEFAULT_CHUNK = 1 << 20
TRANSPORTS = ("auto", "shm", "tcp", "grpc")


class ClientBase:
    def __init__(
        self,
        address: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float | None = None,
        checksum: bool = True,
        transport: str = "auto",
        codec: str = "none",
        layout: str = "",
        link_gbps: float | None = None,
    ) -> None:
        """`checksum` (on by default): send an xxh3 of every payload (the node verifies it)
        and verify every block got, so a tampered, torn or misdirected block is a
        `CorruptBlock`, never bytes served as another's.
        `codec="auto"` picks the lossless codec that pays off on a `link_gbps` link (none
        when unlimited), once per kind (dtype, shape, layout) of payload."""
        if transport not in TRANSPORTS:
            raise InvalidArgument("transport", f"must be one of {', '.join(TRANSPORTS)}")
        self.address = address
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.checksum = checksum
        self.encoding = Encoding(codec, layout, checksum)
        self.link_gbps = link_gbps
        self._auto: dict[tuple, str] = {}
        self._capacity: int | None = None  # bytes the node holds in all its tiers
        self.transport = transport
        self._tcp_ok = transport in ("auto", "tcp")
        self._pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="kvstore-codec")
        self._data = DataConnections(timeout, address.rpartition(":")[0].strip("[]"))
        self._open()

    def _encoding(self, codec: str | None, layout: str | None, payloads: Sequence) -> Encoding:
        """The encoding of a put, with `auto` resolved for its first payload's kind."""
        encoding = self.encoding.with_overrides(codec, layout)
        if encoding.codec != "auto":
            return encoding
        sample = payloads[0] if payloads else b""
        array = sample if isinstance(sample, np.ndarray) else np.frombuffer(sample, np.uint8)
        kind = (array.dtype.str, array.shape, encoding.layout)
        if kind not in self._auto:
            cores = self._pool._max_workers
            self._auto[kind] = codecs.choose(array, encoding.layout, self.link_gbps, cores)
        return replace(encoding, codec=self._auto[kind])

    def _open(self) -> None:
        """Open the gRPC channel: sync or asyncio, each client its own."""
        raise NotImplementedError

    def _check_fits(self, capacity: int, sizes: Sequence[int]) -> None:
        """A put must fit the node whole, or its last blocks would evict its first."""
        need = sum(HostTier.slot_cost(size) for size in sizes)
        if need > capacity:
            raise ResourceExhausted(
                f"blocks: {len(sizes)} blocks take {need} bytes of the node's slots (a slot is "
                f"at least 4 KiB), more than its capacity of {capacity}: put smaller batches"
            )

    def _fall_back(self, exc: Unavailable | Unsupported) -> None:
        """The data plane is off or unreachable: use gRPC from now on, unless forced."""
        if self.transport == "tcp":
            raise exc
        self._tcp_ok = False

    def _close_local(self) -> None:
        self._pool.shutdown(wait=False)
        self._data.close()
