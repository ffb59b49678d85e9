"""Fetch-through and waiting: a node answers for the cluster's blocks, and for blocks a
producer is still writing.

With `fetch`, a get, lease or lookup whose local prefix ends before the cluster's first
pulls the missing run from the best holder (the index's choice), node to node over that
node's data plane, straight into reserved host slots, each block published only once it
is whole and matches its checksum: where both nodes run NIXL, the holder WRITEs them into
those slots (this node's arena is registered with its client of the holder), else they
come over the holder's TCP data plane. A holder that fails half way leaves the blocks
that arrived whole; the next holder is asked for the rest. Requests that need a run
another request is fetching wait for that fetch instead of starting a second.

With `wait`, keys[0] gets that long to arrive (locally, or with `fetch` anywhere in the
cluster); a put that was bringing it and fails ends the wait at once, and so does one
that failed shortly before the wait began (the store remembers it: `Store.abandoned`).

A fetch is bounded: it dials at most `MAX_HOLDERS` holders, passes over for `FAILED_FOR`
seconds a holder that just failed, and stops by the caller's deadline and after
`MAX_FETCH` seconds. Clients of holders (and of push targets: `call`) are kept for
`PEER_IDLE` seconds unused, and at most `MAX_PEERS` of them (the least recently used
closed first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from kvstore.errors import Busy, KVStoreError, Unavailable
from kvstore.ingest import check_fits, check_payload, validate_block
from kvstore.keys import BlockKey
from kvstore.meta import BlockMeta
from kvstore.server.cluster import Membership
from kvstore.server.tls import PeerOptions
from kvstore.store import Store
from kvstore.tiers import Reservation

if TYPE_CHECKING:
    from kvstore.client import Client

log = logging.getLogger("kvstore.fetch")
MAX_WAIT = 300.0  # seconds a request may wait for blocks to arrive
MAX_WAITING = 8  # requests waiting at once; more are refused (they hold serving threads)
RUN = 256  # keys asked of a holder at once (their slots are reserved together)
POLL = 0.02  # seconds between looks at the cluster while waiting with fetch
MAX_HOLDERS = 3  # holders dialed per fetch: the best, and two to take over where one failed
MAX_FETCH = 30.0  # seconds one fetch may take, whatever the caller's deadline
FAILED_FOR = 5.0  # seconds a holder that just failed is passed over
MAX_FAILED = 4096  # holders remembered as failed at once
MAX_PEERS = 16  # holders this node keeps a client of (the least recently used closed first)
PEER_IDLE = 60.0  # seconds a client of a holder is kept unused
T = TypeVar("T")


@dataclass(eq=False, slots=True)
class _Peer:
    client: Client  # of the other node
    used: float  # time.monotonic() of its last use
    users: int = 0  # fetches using it now: it is closed only once they are done
    evicted: bool = False
    opened: bool = False  # its path chosen, and this node's arena registered where NIXL
    served: bool = False  # an operation through it succeeded
    opening: threading.Lock = field(default_factory=threading.Lock)


class Fetcher:
    def __init__(
        self,
        store: Store,
        membership: Membership,
        timeout: float,
        peer_options: PeerOptions | None = None,
        nixl: bool = False,
    ) -> None:
        self.store = store
        self.peer_options = peer_options or {}  # how this node calls others: token, TLS
        self.transport = "auto" if nixl else "tcp"  # auto: NIXL where the peer runs it too
        self.membership = membership
        self.timeout = timeout
        self._waiting = threading.BoundedSemaphore(MAX_WAITING)
        self._lock = threading.Lock()
        self._running: dict[BlockKey, threading.Event] = {}  # first key of a run being fetched
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # least recently used first
        self._failed: dict[str, float] = {}  # holder address -> until when it is passed over
        self._counts: dict[str, list[int]] = {}  # node id -> [blocks, bytes]
        self._background = ThreadPoolExecutor(4, thread_name_prefix="kvstore-prefetch")
        self._following: set[BlockKey] = set()  # first keys of prompts followed
        self._closing = threading.Event()
        threading.Thread(target=self._sweep, name="kvstore-peers", daemon=True).start()

    def ensure(
        self,
        keys: Sequence[BlockKey],
        wait_ms: int,
        fetch: bool,
        alive: Callable[[], bool] = lambda: True,
        answer_by: float | None = None,
    ) -> None:
        """Before a get, lease or lookup of `keys` is answered: fetch what the cluster has
        and this node lacks, and give keys[0] up to `wait_ms` to arrive; a caller that
        is gone (`alive()` false) or a node that closes ends the wait. `answer_by`
        (time.monotonic()): the caller's deadline, which ends any fetch."""
        fetch = fetch and self.membership.index is not None
        if fetch:
            self.fill(keys, answer_by)
        if not wait_ms or self.store.contains(keys[0]):
            return
        if not self._waiting.acquire(blocking=False):
            raise Busy(f"{MAX_WAITING} requests already wait for blocks: retry")
        try:
            deadline = time.monotonic() + min(wait_ms / 1000, MAX_WAIT)
            if fetch:  # pull the rest as it appears, while the caller reads what is here
                self._follow(keys, deadline)

            def waiting() -> bool:
                return alive() and not self._closing.is_set()

            while (left := deadline - time.monotonic()) > 0 and waiting():
                if not fetch:  # only a local put can bring it: wait for that
                    self.store.wait_present(keys[0], left, waiting)
                    return
                if self.store.wait_present(keys[0], min(left, POLL)) or self.fill(keys, answer_by):
                    return
                if self.store.abandoned(keys[0]):  # a put of it here died, and none is on
                    return
        finally:
            self._waiting.release()

    def _follow(self, keys: Sequence[BlockKey], deadline: float) -> None:
        """In the background, until `deadline` or every key is here: fetch what the cluster
        has of `keys` as it appears (one follower per prompt)."""
        with self._lock:
            if keys[0] in self._following:
                return
            self._following.add(keys[0])

        def follow() -> None:
            try:
                while time.monotonic() < deadline and self.store.present(keys) < len(keys):
                    if not self.fill(keys):
                        self._closing.wait(POLL)
            finally:
                with self._lock:
                    self._following.discard(keys[0])

        self._background.submit(follow)

    def prefetch(self, keys: Sequence[BlockKey]) -> tuple[int, bool]:
        """Start filling `keys` in the background: (leading keys held now, started)."""
        present = self.store.present(keys)
        if present == len(keys) or self.membership.index is None:
            return present, False
        self._background.submit(self._quietly, list(keys))
        return present, True

    def fill(self, keys: Sequence[BlockKey], answer_by: float | None = None) -> int:
        """Make the local prefix of `keys` as long as the cluster's, within `MAX_FETCH`
        seconds and by `answer_by` (time.monotonic()); blocks fetched."""
        limit = time.monotonic() + MAX_FETCH
        limit = limit if answer_by is None else min(limit, answer_by)
        fetched = 0
        while (n := self.store.present(keys)) < len(keys) and time.monotonic() < limit:
            run = keys[n]
            with self._lock:
                running = self._running.get(run)
                if running is None:
                    self._running[run] = threading.Event()
            if running is not None:  # another request fetches this run: wait for it
                running.wait(max(0.0, min(self.timeout, limit - time.monotonic())))
                if self.store.present(keys) == n:
                    return fetched
                continue
            try:
                got = self._fetch(keys[n:], limit)
            finally:
                with self._lock:
                    self._running.pop(run).set()
            fetched += got
            if not got:
                return fetched
        return fetched

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            counts = {node: list(c) for node, c in self._counts.items()}
        return {n: c[0] for n, c in counts.items()}, {n: c[1] for n, c in counts.items()}

    def close(self) -> None:
        self._closing.set()
        self._background.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle = [self._evict(address) for address in list(self._peers)]
        _close(idle)

    def _fetch(self, keys: Sequence[BlockKey], limit: float) -> int:
        """Pull the leading run of `keys` from the best holders (at most `MAX_HOLDERS`, and
        none that just failed), until `limit` (time.monotonic()); blocks landed here."""
        index = self.membership.index
        if index is None:
            return 0
        try:
            holders = [loc for loc in index.locate(keys) if loc.node_id != self.membership.node_id]
        except KVStoreError as exc:
            log.info("fetch-through: cannot locate holders: %s", exc)
            return 0
        landed = tried = 0
        for holder in holders:  # best first; the next one takes over where one failed
            if holder.matched <= landed or self._passed_over(holder.address):
                continue
            if tried == MAX_HOLDERS or time.monotonic() >= limit:
                break
            tried += 1
            try:
                self._pull(holder.node_id, holder.address, keys[landed : holder.matched], limit)
            except (KVStoreError, OSError) as exc:
                log.warning("fetch-through from %s stopped: %s", holder.node_id, exc)
                self._failed_now(holder.address)
            landed = self.store.present(keys)  # whole blocks stay, whatever stopped it
            if landed >= holders[0].matched:
                break
        return landed

    def _pull(self, node: str, address: str, keys: Sequence[BlockKey], limit: float) -> None:
        def runs(peer: Client) -> None:
            rest = keys[self.store.present(keys) :]  # what an earlier try did not land
            for start in range(0, len(rest), RUN):
                if start and time.monotonic() >= limit:
                    break
                run = rest[start : start + RUN]
                landing = _Landing(self.store, run, lambda size: self._count(node, size))
                try:
                    got = peer.get_into(run, landing.place, landing.landed)
                finally:
                    landing.abort_rest()
                if got < len(run):
                    break

        self.call(address, runs)

    def call(self, address: str, operation: Callable[[Client], T]) -> T:
        """`operation` with this node's client of the node at `address`, kept between calls.
        A kept client that served before and fails now (that node restarted, or the
        cluster's secret rotated) is dropped, and the operation made once more with a new
        client, to which that node proves itself anew."""
        retried = False
        while True:
            kept = False
            try:
                with self._peer(address) as peer:
                    kept = peer.served
                    result = operation(self._opened(peer))
                    peer.served = True
                return result
            except (KVStoreError, OSError):
                if retried or not kept:
                    raise
                retried = True

    def _opened(self, peer: _Peer) -> Client:
        """The peer's client, its path chosen; where that is NIXL, this node's host arena
        registered with it, so the other node WRITEs straight into the slots a fetch
        reserves and READs a push straight from the pinned blocks."""
        with peer.opening:
            if not peer.opened:
                if peer.client.path == "nixl":
                    peer.client.register(self.store.host.arena.memory)
                peer.opened = True
        return peer.client

    @contextmanager
    def _peer(self, address: str) -> Iterator[_Peer]:
        """This node's client of the node at `address` (made on first use; dropped if the
        call fails, so the next one starts afresh)."""
        from kvstore.client import Client  # a node fetching is a client of the holder

        with self._lock:
            peer = self._peers.get(address)
            if peer is None:
                client = Client(
                    address,
                    transport=self.transport,
                    shm=False,
                    timeout=self.timeout,
                    **self.peer_options,
                )
                peer = self._peers[address] = _Peer(client, time.monotonic())
            self._peers.move_to_end(address)
            peer.users += 1
            stale = self._stale(time.monotonic())
        _close(stale)
        ok = False
        try:
            yield peer
            ok = True
        finally:
            with self._lock:
                peer.users -= 1
                peer.used = time.monotonic()
                if not ok and self._peers.get(address) is peer:
                    self._evict(address)
                done = [peer] if peer.evicted and not peer.users else []
            _close(done)

    def _stale(self, now: float) -> list[_Peer]:
        """Evict the clients unused for `PEER_IDLE` and those past `MAX_PEERS` (lock held);
        those no fetch uses now, to be closed."""
        idle = [a for a, p in self._peers.items() if not p.users and now - p.used > PEER_IDLE]
        stale = [self._evict(address) for address in idle]
        while len(self._peers) > MAX_PEERS:
            stale.append(self._evict(next(iter(self._peers))))
        return [peer for peer in stale if peer is not None]

    def _evict(self, address: str) -> _Peer | None:
        """Out of the cache (lock held): the peer, if no fetch uses it (close it then)."""
        peer = self._peers.pop(address)
        peer.evicted = True
        return None if peer.users else peer

    def _sweep(self) -> None:
        while not self._closing.wait(PEER_IDLE / 4):
            with self._lock:
                stale = self._stale(time.monotonic())
            _close(stale)

    def peer_count(self) -> int:
        """Clients of holders kept now."""
        with self._lock:
            return len(self._peers)

    def _passed_over(self, address: str) -> bool:
        """Whether the holder at `address` failed less than `FAILED_FOR` seconds ago."""
        with self._lock:
            until = self._failed.get(address)
            if until is not None and until <= time.monotonic():
                del self._failed[address]
                until = None
        return until is not None

    def _failed_now(self, address: str) -> None:
        with self._lock:
            now = time.monotonic()
            if len(self._failed) >= MAX_FAILED:
                self._failed = {a: t for a, t in self._failed.items() if t > now}
                while len(self._failed) >= MAX_FAILED:
                    del self._failed[next(iter(self._failed))]
            self._failed.pop(address, None)  # re-inserted last: the oldest go first
            self._failed[address] = now + FAILED_FOR

    def _count(self, node: str, nbytes: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(node, [0, 0])
            counts[0] += 1
            counts[1] += nbytes

    def _quietly(self, keys: list[BlockKey]) -> None:
        try:
            self.fill(keys)
        except Exception:
            log.exception("prefetch failed")


def _close(peers: Sequence[_Peer | None]) -> None:
    for peer in peers:
        if peer is not None:
            try:
                peer.client.close()
            except Exception:  # a client that cannot close cleanly is gone all the same
                log.debug("closing a client of a holder failed", exc_info=True)


class _Landing:
    """One run of fetched blocks: slots reserved for them as the holder answers, each
    published once whole and checked, those that never land freed. The holder's answer
    must name exactly the keys asked, in order, with blocks the node would take in a put."""

    def __init__(
        self, store: Store, asked: Sequence[BlockKey], counted: Callable[[int], None]
    ) -> None:
        self.store = store
        self.asked = asked
        self.counted = counted
        self.slots: list[Reservation] = []
        self.blocks: list[tuple[BlockKey, BlockMeta]] = []
        self.done = 0

    def place(self, blocks: list[tuple[BlockKey, BlockMeta]]) -> list[memoryview]:
        if [key for key, _ in blocks] != list(self.asked[: len(blocks)]):
            raise Unavailable("the holder answered with keys it was not asked for")
        seen: set[BlockKey] = set()
        for i, (key, meta) in enumerate(blocks):  # what a put of these blocks must pass
            validate_block(self.store, i, key, meta, seen)
        sizes = [meta.size for _, meta in blocks]
        check_fits(self.store, sum(self.store.host.slot_cost(s) for s in sizes), len(blocks))
        self.slots = self.store.reserve_many(sizes)
        self.blocks = blocks
        return [slot.view for slot in self.slots]

    def landed(self, i: int) -> None:
        key, meta = self.blocks[i]
        check_payload(i, key, meta, self.slots[i].view)
        self.store.commit(key, meta, self.slots[i])
        self.done = i + 1
        self.counted(meta.size)

    def abort_rest(self) -> None:
        for slot in self.slots[self.done :]:
            self.store.abort(slot)
