"""The seam every transfer path fits: the client chooses a path and runs the codec
pipeline; a path only moves blocks (kvstore/client/{shm,tcp,grpc}.py, each with its
node half under the same name in kvstore/server/)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvstore.client.pipeline import Block, Received
from kvstore.keys import BlockKey
from kvstore.proto import kvstore_pb2 as pb
from kvstore.results import PutResult

Out = memoryview | np.ndarray | None


@dataclass(frozen=True)
class Ask:
    """The keys of a get, lease or lookup, and how hard the node should look for them:
    `wait_ms` for keys[0] to arrive, `fetch` from other nodes what it lacks."""

    keys: Sequence[BlockKey]
    wait_ms: int = 0
    fetch: bool = False

    def message(self) -> bytes:
        request = pb.GetRequest(keys=self.keys, wait_ms=self.wait_ms, fetch=self.fetch)
        return request.SerializeToString()


Arrived = Callable[[Sequence[np.ndarray], Sequence[Block]], None]  # blocks landed so far


class Transport(Protocol):
    name: str  # "shm", "tcp" or "grpc"

    def put(
        self, blocks: Sequence[Block], views: Sequence[memoryview], durable: bool = False
    ) -> PutResult:
        """Store whole blocks; those already present are acknowledged, not sent again.
        `durable`: acknowledged only once on the node's disk."""
        ...

    def get(self, ask: Ask, out: Out, arrived: Arrived | None) -> Received:
        """The present prefix of the keys (at most one request's worth), into `out` if
        given, parts handed to `arrived` as they land."""
        ...

    def lookup(self, ask: Ask) -> list[str]:
        """The tier of each block of the present prefix of the keys."""
        ...

    def close(self) -> None: ...
