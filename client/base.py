"""What the sync and async clients share that does no I/O: settings, the codec pool,
the data-plane connections, and the choice of transfer path."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from kvstore.client._wire import Encoding
from kvstore.client.dataplane import DataConnections
from kvstore.errors import InvalidArgument, Unavailable, Unsupported

DEFAULT_CHUNK = 1 << 20
TRANSPORTS = ("auto", "shm", "tcp", "grpc")


class ClientBase:
    def __init__(
        self,
        address: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float | None = None,
        checksum: bool = False,
        transport: str = "auto",
        codec: str = "none",
        layout: str = "",
    ) -> None:
        """`checksum`: send an xxh3 of every payload (the node verifies it) and verify on get."""
        if transport not in TRANSPORTS:
            raise InvalidArgument("transport", f"must be one of {', '.join(TRANSPORTS)}")
        self.address = address
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.checksum = checksum
        self.encoding = Encoding(codec, layout, checksum)
        self.transport = transport
        self._tcp_ok = transport in ("auto", "tcp")
        self._pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="kvstore-codec")
        self._data = DataConnections(timeout, address.rpartition(":")[0].strip("[]"))
        self._open()

    def _open(self) -> None:
        """Open the gRPC channel: sync or asyncio, each client its own."""
        raise NotImplementedError

    def _fall_back(self, exc: Unavailable | Unsupported) -> None:
        """The data plane is off or unreachable: use gRPC from now on, unless forced."""
        if self.transport == "tcp":
            raise exc
        self._tcp_ok = False

    def _close_local(self) -> None:
        self._pool.shutdown(wait=False)
        self._data.close()
