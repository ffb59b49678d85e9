"""A node's side of the cluster location index: its entries, published off the caller's path.

`stored`, `moved`, `removed` and `cleared` only update an in-memory map of
pending changes (one lock, no I/O, never waits on Redis). A background thread
registers the node, heartbeats, and writes the changes in batches (a round trip each).
Whenever Redis may have lost or never seen some of them (the node's record
vanished because Redis restarted empty or the TTL ran out during an outage,
the pending map overflowed, or the node was cleared), the thread registers
under a new slot, which makes every old entry stop counting at once, and
re-publishes what `listing()` says the node holds. So the index converges
whatever happened while Redis was away, and a node with Redis down serves
local-only meanwhile.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from kvstore.cluster.connection import REDIS_ERRORS, LazyClient, parse_redis_url
from kvstore.cluster.entries import Change, EntryWriter
from kvstore.cluster.layout import checked_keys, layout_for, tier_code
from kvstore.cluster.locate import Locator
from kvstore.cluster.registry import NodeRecord, NodeUsage, Registration, Registry
from kvstore.cluster.scoring import Location, Scorer, score
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.keys import BlockKey, check_key
from kvstore.trust import ClusterSecret

log = logging.getLogger("kvstore.cluster")

Listing = Callable[[], Iterable[tuple[BlockKey, str]]]


@dataclass(frozen=True, slots=True)
class IndexStats:
    connected: bool  # registered, and the last round of Redis work succeeded
    slot: int | None  # this registration's slot; None before the first
    incarnation: int | None
    pending: int  # changes waiting to be written
    queued: int  # changes reported through stored/moved/removed since start
    published: int  # entries written: changes and re-published entries
    errors: int  # failed rounds of Redis work (each one retried)
    reconnects: int  # outages that ended
    republishes: int  # full re-publishes completed
    overflows: int  # times the pending map was dropped for a re-publish


class ClusterIndex:
    """This node's registration and entries in the cluster index, plus `locate` over all nodes.

    `listing()` must yield every (key, tier) the node holds, from the index's
    thread while puts go on; report each change after `listing()` would show it.
    The index keeps one tier per (block, node): the fastest the node holds it in.
    """

    def __init__(
        self,
        redis_url: str,
        node_id: str,
        address: str,
        listing: Listing,
        *,
        secret: ClusterSecret,
        data_address: str = "",
        usage: Callable[[], NodeUsage] | None = None,
        heartbeat_s: float = 1.0,
        ttl_s: float = 5.0,
        prefix: str = "kv:",
        max_pending: int = 100_000,
        batch: int = 1_000,
        timeout_s: float = 1.0,
        max_backoff_s: float = 5.0,
        weights: Mapping[str, float] | None = None,
        scorer: Scorer = score,
        seed: int | None = None,
    ) -> None:
        _check(node_id, "node_id", isinstance(node_id, str) and node_id != "", "a non-empty string")
        _check(heartbeat_s, "heartbeat_s", heartbeat_s > 0, "> 0")
        _check(ttl_s, "ttl_s", ttl_s > heartbeat_s, f"> heartbeat_s ({heartbeat_s})")
        _check(max_pending, "max_pending", max_pending >= 1, ">= 1")
        _check(batch, "batch", batch >= 1, ">= 1")
        _check(timeout_s, "timeout_s", timeout_s > 0, "> 0")
        _check(max_backoff_s, "max_backoff_s", max_backoff_s > 0, "> 0")
        self._client = LazyClient(parse_redis_url(redis_url), timeout_s)
        self._layout = layout_for(prefix)
        self._secret = secret  # signs this node's record; only signed records are believed
        self._locator = Locator(self._client, self._layout, weights, scorer, seed, secret)
        self._node = (node_id, address, data_address)
        self._listing = listing
        self._usage = usage or NodeUsage
        self._heartbeat_s = heartbeat_s
        self._ttl_ms = round(ttl_s * 1000)
        self._max_pending = max_pending
        self._batch = batch
        self._max_backoff_s = max_backoff_s

        self._lock = threading.Lock()  # guards _pending and _republish_due
        self._pending: dict[BlockKey, int | None] = {}
        self._republish_due = True
        self._wake = threading.Event()
        self._closing = threading.Event()
        # owned by the thread below
        self._registry: Registry | None = None
        self._writer: EntryWriter | None = None
        self._registration: Registration | None = None
        self._next_beat = 0.0
        self._failures = 0  # consecutive failed rounds
        self._down_since = 0.0
        self._usage_failed = False
        self._counts = dict.fromkeys(
            ("queued", "published", "errors", "reconnects", "republishes", "overflows"), 0
        )
        self._thread = threading.Thread(target=self._run, name="kvstore-cluster-index", daemon=True)
        self._thread.start()

    # -- what the node calls: in memory only, never blocks on Redis

    def stored(self, keys: Sequence[BlockKey], tier: str) -> None:
        self._queue(keys, tier_code(tier))

    def moved(self, keys: Sequence[BlockKey], tier: str) -> None:
        """Demoted or promoted: `tier` is now the fastest tier holding `keys`."""
        self._queue(keys, tier_code(tier))

    def removed(self, keys: Sequence[BlockKey]) -> None:
        self._queue(keys, None)

    def cleared(self) -> None:
        """Everything went: drop pending changes and re-publish (an empty) listing()."""
        with self._lock:
            self._pending.clear()
            self._republish_due = True
        self._wake.set()

    def locate(self, keys: Sequence[BlockKey]) -> list[Location]:
        """Nodes holding a prefix of `keys`, best first (see `kvstore.router.Router.locate`)."""
        return self._locator.locate(keys)

    def nodes(self) -> list[NodeRecord]:
        """Every live node's registration (Unavailable while Redis is away)."""
        try:
            return Registry(self._client.get(), self._layout, self._secret).live_nodes()
        except REDIS_ERRORS as exc:
            raise Unavailable(f"cluster index at {self._client.target.shown}: {exc}") from exc

    def stats(self) -> IndexStats:
        with self._lock:
            pending, counts = len(self._pending), dict(self._counts)
        reg = self._registration
        return IndexStats(
            connected=self._failures == 0 and reg is not None,
            slot=reg.slot if reg else None,
            incarnation=reg.incarnation if reg else None,
            pending=pending,
            **counts,
        )

    def close(self) -> None:
        """Stop the thread and drop this node's record, so it leaves every answer now."""
        self._closing.set()
        self._wake.set()
        self._thread.join()
        self._client.close()

    def __enter__(self) -> ClusterIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _queue(self, keys: Sequence[BlockKey], code: int | None) -> None:
        checked = checked_keys(keys)
        with self._lock:
            self._counts["queued"] += len(checked)
            if self._republish_due:  # the coming re-publish reads listing() instead
                return
            if len(self._pending) + len(checked) > self._max_pending:
                self._overflow()
            else:
                self._pending.update(dict.fromkeys(checked, code))
        self._wake.set()

    def _overflow(self) -> None:
        """Under the lock: drop every pending change; listing() will cover them."""
        self._pending.clear()
        self._republish_due = True
        self._counts["overflows"] += 1
        log.warning("cluster index: over %d changes pending; re-publishing", self._max_pending)

    # -- the thread

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._round()
            except Exception as exc:  # Redis trouble, or a failing listing() / usage()
                self._failed(exc)
                self._closing.wait(self._backoff())
                continue
            self._recovered()
            self._wake.wait(max(0.0, self._next_beat - time.monotonic()))
            self._wake.clear()
        self._deregister()

    def _round(self) -> None:
        if self._writer is None:
            redis = self._client.get()
            self._registry = Registry(redis, self._layout, self._secret)
            self._writer = EntryWriter(redis, self._layout, self._client.target.cluster)
        with self._lock:
            republish, self._republish_due = self._republish_due, False
            if republish:
                self._pending.clear()
        if republish:
            self._republish()
        if self._beat_if_due():
            self._drain()

    def _republish(self) -> None:
        """Register under a new slot, then write everything listing() yields."""
        assert self._registry is not None  # made by the round
        try:
            reg = self._registry.register(*self._node, self._usage_now(), self._ttl_ms)
            self._registration = reg
            self._next_beat = time.monotonic() + self._heartbeat_s
            entries = ((check_key(key), tier_code(tier)) for key, tier in self._listing())
            for chunk in _batched(entries, self._batch):
                if not self._write(chunk, sweep=reg.previous_slot) or self._republish_due:
                    return  # the next round starts over
                if self._closing.is_set():
                    return
        except BaseException:
            with self._lock:
                self._republish_due = True
            raise
        self._count("republishes")

    def _drain(self) -> None:
        with self._lock:
            changes, self._pending = self._pending, {}
        items = list(changes.items())
        for start in range(0, len(items), self._batch):
            try:
                written = self._write(items[start : start + self._batch])
            except BaseException:
                self._requeue(items[start:])
                raise
            if not written:
                return  # registration lost: the re-publish covers the rest

    def _write(self, changes: Sequence[Change], sweep: int | None = None) -> bool:
        """Write a batch, then heartbeat if one is due; False if the registration is gone."""
        assert self._writer is not None and self._registration is not None  # registered first
        if not self._writer.write(self._registration, changes, sweep):
            self._lost()
            return False
        self._count("published", len(changes))
        return self._beat_if_due()

    def _requeue(self, changes: Sequence[Change]) -> None:
        """Put unwritten changes back under any newer ones (each key's last change wins)."""
        with self._lock:
            if self._republish_due:
                return
            newer, self._pending = self._pending, dict(changes)
            self._pending.update(newer)
            if len(self._pending) > self._max_pending:
                self._overflow()

    def _beat_if_due(self) -> bool:
        """Heartbeat if one is due; False if the registration is gone (a re-publish is due)."""
        assert self._registry is not None and self._registration is not None  # registered first
        now = time.monotonic()
        if now < self._next_beat:
            return True
        self._next_beat = now + self._heartbeat_s
        if self._registry.heartbeat(self._registration, self._usage_now(), self._ttl_ms):
            return True
        self._lost()
        return False

    def _lost(self) -> None:
        assert self._registration is not None
        log.warning(
            "cluster index: the record of %s (slot %d) is gone from %s; re-publishing",
            self._node[0],
            self._registration.slot,
            self._client.target.shown,
        )
        with self._lock:
            self._republish_due = True
        self._wake.set()  # now, not at the next heartbeat

    def _usage_now(self) -> NodeUsage:
        try:
            return self._usage()
        except Exception:  # a broken usage() must not keep the node out of the index
            if not self._usage_failed:
                log.exception("cluster index: usage() failed; reporting no usage")
                self._usage_failed = True
            return NodeUsage()

    def _failed(self, exc: Exception) -> None:
        self._count("errors")
        self._failures += 1
        self._next_beat = 0.0  # check the registration before writing again
        if self._failures > 1:  # warned once per outage
            log.debug("cluster index: still failing: %r", exc)
            return
        self._down_since = time.monotonic()
        redis_trouble = isinstance(exc, REDIS_ERRORS)
        log.warning(
            "cluster index: %s; node %s serves local-only and keeps retrying",
            f"{self._client.target.shown} unavailable ({exc})" if redis_trouble else "failed",
            self._node[0],
            exc_info=not redis_trouble,
        )

    def _recovered(self) -> None:
        if self._failures == 0:
            return
        log.info(
            "cluster index: %s is back after %.1fs (%d failed tries)",
            self._client.target.shown,
            time.monotonic() - self._down_since,
            self._failures,
        )
        self._failures = 0
        self._count("reconnects")

    def _backoff(self) -> float:
        """Capped exponential, with jitter so that a thousand nodes do not retry in step."""
        delay = min(self._max_backoff_s, 0.05 * 2 ** min(self._failures, 16))
        return delay * random.uniform(0.5, 1)

    def _deregister(self) -> None:
        if self._registration is None or self._registry is None:
            return
        try:
            self._registry.deregister(self._registration)
        except REDIS_ERRORS as exc:  # Redis is away: the record expires with its TTL instead
            log.debug("cluster index: could not deregister: %s", exc)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n


def _batched(items: Iterable[Change], size: int) -> Iterator[list[Change]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _check(value: object, field: str, ok: bool, expected: str) -> None:
    if not ok:
        raise InvalidArgument(field, f"must be {expected}, got {value!r}")
