"""The seam every transfer path fits: the client chooses a path and runs the codec
pipeline; a path only moves blocks (kvstore/client/{shm,tcp,grpc}.py, each with its
node half under the same name in kvstore/server/)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from kvstore.client.pipeline import Block, Received
from kvstore.ingest import PutResult
from kvstore.keys import BlockKey

Out = memoryview | np.ndarray | None
Arrived = Callable[[Sequence[np.ndarray], Sequence[Block]], None]  # blocks landed so far


class Transport(Protocol):
    name: str  # "shm", "tcp" or "grpc"

    def put(self, blocks: Sequence[Block], views: Sequence[memoryview]) -> PutResult:
        """Store whole blocks; those already present are acknowledged, not sent again."""
        ...

    def get(self, keys: Sequence[BlockKey], out: Out, arrived: Arrived | None) -> Received:
        """The present prefix of `keys` (at most one request's worth), into `out` if given,
        parts handed to `arrived` as they land."""
        ...

    def lookup(self, keys: Sequence[BlockKey]) -> list[str]:
        """The tier of each block of the present prefix of `keys`."""
        ...

    def close(self) -> None: ...
