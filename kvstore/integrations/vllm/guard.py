"""Calls to the node that vLLM must survive: a node that is down, slow or wrong costs one
timeout, a log line and a count, then it is left alone for a while (every request misses, no
saves are tried) instead of stalling each request in turn."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from kvstore.client import Client
from kvstore.integrations.vllm.config import ConnectorConfig

log = logging.getLogger("kvstore.vllm")
T = TypeVar("T")


class NodeGuard:
    """One node as one side of the connector sees it. Thread-safe."""

    def __init__(self, config: ConnectorConfig, timeout_s: float, side: str) -> None:
        self.config = config
        self.side = side
        self._timeout_s = timeout_s
        self._client: Client | None = None
        self._down_until = 0.0
        self._failures = 0
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    @property
    def client(self) -> Client:
        """Opened on first use, in the process (and thread) that uses it."""
        with self._lock:
            if self._client is None:
                self._client = Client(
                    self.config.address,
                    transport=self.config.transport,
                    timeout=self._timeout_s,
                    checksum=self.config.checksum,
                    codec=self.config.codec,
                )
            return self._client

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def call(self, doing: str, call: Callable[[], T], fallback: T) -> T:
        """`call()`, or `fallback` when it fails or the node is being left alone."""
        if not self.available():
            self.counts[f"{doing}_skipped"] += 1
            return fallback
        try:
            result = call()
        except Exception as exc:  # anything from the node ends in a recompute, never in vLLM
            self.failed(doing, exc)
            return fallback
        self.succeeded()
        return result

    def failed(self, doing: str, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            first = self._failures == 1
            self._down_until = time.monotonic() + self.config.retry_after_s
        self.counts[f"{doing}_failed"] += 1
        (log.warning if first else log.debug)(
            "kvstore %s (%s side, pid %d): %s failed, recomputing instead and leaving the "
            "node alone for %gs: %s: %s",
            self.config.address,
            self.side,
            os.getpid(),
            doing,
            self.config.retry_after_s,
            type(exc).__name__,
            exc,
        )

    def succeeded(self) -> None:
        if self._failures and self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.info("kvstore %s (%s side): reachable again", self.config.address, self.side)

    def take_counts(self) -> Counter[str]:
        """The counts so far, and zero from here (swapped: other threads keep counting)."""
        counts, self.counts = self.counts, Counter()
        return counts

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def unpin_thread() -> None:
    """vLLM pins its compute threads to their cores, and new threads inherit that; the
    connector's I/O threads may run on any core (on a small machine, the one vLLM keeps for
    its scheduler), so they take no time from the forward pass's own core."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or a cpuset forbids it
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
