"""The node's event log: sequenced batches in a bounded ring, read by the publisher and `Watch`."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice

from kvstore.errors import InvalidArgument, OutOfRange
from kvstore.events.schema import (
    MEDIUMS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    wire_hash,
)
from kvstore.results import Batch


class SequenceTooOld(OutOfRange):
    """The log no longer holds `requested`; the oldest batch it retains is `oldest`.

    A watcher that gets this has missed events: it must rebuild its view (from `Lookup` or
    `Locate`) and resume from `oldest`, or from the live end.
    """

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"sequence {requested} is no longer retained (oldest is {oldest})")
        self.requested = requested
        self.oldest = oldest


class EventLog:
    """A thread-safe, bounded log of KV events, sealed into sequenced batches.

    Appends never wait on a reader: they take one short lock (no I/O, no encoding), and every
    `max_batch_events`-th append seals a batch in place, as does one that would take the batch
    past `max_batch_keys` block hashes (`stored` and `removed` split longer lists into events
    of at most that many, so a batch's payload stays small: about 100 KiB at the defaults,
    without token ids). A background thread seals whatever is pending `flush_interval` seconds
    after its first event. Batches get gap-free sequence numbers from 0. The newest
    `retained_batches` (holding at most `retained_keys` block hashes) are kept for replay;
    older ones are dropped, never an append. The defaults keep seconds of a busy node's
    history in about 10 MiB, so the ring fills, and the node's memory levels off, within a
    minute. After `close()` appends are ignored: a put must never fail because the event
    stream is down.

    `block_size` (tokens per block; 0 when unknown, as vLLM's offloading placeholders send) and
    `int_hashes` (keys as 64-bit integers: vLLM's default and what Dynamo requires; see
    `wire_hash`) apply to every event the helpers build.
    """

    def __init__(
        self,
        *,
        block_size: int = 0,
        int_hashes: bool = False,
        flush_interval: float = 0.01,
        max_batch_events: int = 256,
        max_batch_keys: int = 4096,
        retained_batches: int = 1_000,
        retained_keys: int = 131_072,
        data_parallel_rank: int | None = 0,
        mediums: Mapping[str, str] = MEDIUMS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check(block_size=block_size, flush_interval=flush_interval, minimum=0)
        _check(max_batch_events=max_batch_events, retained_batches=retained_batches, minimum=1)
        _check(max_batch_keys=max_batch_keys, retained_keys=retained_keys, minimum=1)
        self.block_size = block_size
        self.int_hashes = int_hashes
        self.flush_interval = flush_interval
        self.max_batch_events = max_batch_events
        self.max_batch_keys = max_batch_keys
        self.retained_batches = retained_batches
        self.retained_keys = retained_keys
        self.data_parallel_rank = data_parallel_rank
        self._mediums = dict(mediums)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending_arrived = threading.Condition(self._lock)  # the flusher waits here
        self._sealed = threading.Condition(self._lock)  # watchers wait here
        self._pending: list[KVCacheEvent] = []
        self._pending_since = 0.0
        self._pending_keys = 0
        self._ring: deque[Batch] = deque()
        self._ring_keys = 0
        self._next = 0
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_loop, name="kvstore-events")
        self._flusher.daemon = True
        self._flusher.start()

    # events, as the daemon reports them

    def stored(
        self,
        keys: Sequence[bytes],
        tier: str,
        *,
        parent: bytes | None = None,
        token_ids: Sequence[int] = (),
    ) -> None:
        """Blocks `keys` are now readable in `tier`; `parent` is the key before `keys[0]`.

        More than `max_batch_keys` keys become several events; with a `parent`, each names the
        last key of the one before as its parent (the keys are a chain), and token ids are
        split along (when they are `block_size` per key; otherwise they stay in one event).
        """
        n, as_int = len(keys), self.int_hashes
        per_key = self.block_size if len(token_ids) == n * self.block_size > 0 else 0
        step = self.max_batch_keys if per_key or not len(token_ids) else max(n, 1)
        for start in range(0, n, step):
            part = keys[start : start + step]
            tokens = (
                token_ids[start * per_key : (start + len(part)) * per_key] if per_key else token_ids
            )
            if start and parent is not None:
                parent = keys[start - 1]
            self.append(
                BlockStored(
                    block_hashes=[wire_hash(k, as_int) for k in part],
                    parent_block_hash=None if parent is None else wire_hash(parent, as_int),
                    token_ids=_int_list(tokens),
                    block_size=self.block_size,
                    lora_id=None,
                    medium=self.medium(tier),
                    lora_name=None,
                )
            )

    def removed(self, keys: Sequence[bytes], tier: str) -> None:
        """Blocks `keys` are no longer in `tier` (evicted, demoted away, or deleted)."""
        for start in range(0, len(keys), self.max_batch_keys):
            part = keys[start : start + self.max_batch_keys]
            hashes = [wire_hash(k, self.int_hashes) for k in part]
            self.append(BlockRemoved(block_hashes=hashes, medium=self.medium(tier)))

    def cleared(self) -> None:
        """No block is left in any tier (a fresh start, or a wipe)."""
        self.append(AllBlocksCleared())

    def append(self, event: KVCacheEvent) -> None:
        """Add any vLLM event; it leaves in the next batch."""
        with self._lock:
            if self._closed:
                return
            keys = _key_count(event)
            if self._pending and self._pending_keys + keys > self.max_batch_keys:
                self._seal()  # the batch would grow past max_batch_keys: it leaves without it
            if not self._pending:
                self._pending_since = time.monotonic()
                self._pending_arrived.notify()
            self._pending.append(event)
            self._pending_keys += keys
            if len(self._pending) >= self.max_batch_events or (
                self._pending_keys >= self.max_batch_keys
            ):
                self._seal()

    def medium(self, tier: str) -> str:
        """vLLM's name for a tier: device GPU, host CPU, disk STORAGE, others upper-cased."""
        return self._mediums.get(tier) or tier.upper()

    # reading

    def watch(
        self,
        from_sequence: int | None = None,
        *,
        timeout: float | None = None,
        skip_lost: bool = False,
    ) -> Watch:
        """The batches from `from_sequence` (default: the live end) on, waiting for new ones.

        A sequence the log has not reached yet raises `InvalidArgument`: it comes from a
        watcher of an earlier incarnation of the node, whose numbers restarted at 0.
        """
        with self._lock:
            start = self._next if from_sequence is None else from_sequence
            if not 0 <= start <= self._next:
                raise InvalidArgument(
                    "from_sequence", f"must be in [0, {self._next}], got {from_sequence}"
                )
        return Watch(self, start, timeout, skip_lost)

    def retained(
        self, from_sequence: int, until: int | None = None, *, limit: int | None = None
    ) -> list[Batch]:
        """The retained batches with `from_sequence <= sequence < until`, at once; with
        `limit`, the first `limit` of them only."""
        with self._lock:
            return self._slice(from_sequence, until, limit)

    def flush(self) -> Batch | None:
        """Seal the pending events into a batch now; None when nothing was pending."""
        with self._lock:
            return self._seal() if self._pending else None

    @property
    def next_sequence(self) -> int:
        """The sequence number the next batch will get."""
        with self._lock:
            return self._next

    @property
    def oldest_sequence(self) -> int:
        """The oldest sequence retained (`next_sequence` while none is)."""
        with self._lock:
            return self._oldest()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Seal what is pending and stop; watchers end once they have read every batch."""
        with self._lock:
            if self._closed:
                return
            if self._pending:
                self._seal()
            self._closed = True
            self._pending_arrived.notify_all()
            self._sealed.notify_all()
        self._flusher.join()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # internals: the callers of these hold the lock

    def _oldest(self) -> int:
        return self._ring[0].sequence if self._ring else self._next

    def _seal(self) -> Batch:
        events, self._pending = tuple(self._pending), []
        keys, self._pending_keys = self._pending_keys, 0
        batch = Batch(self._next, self._clock(), events, self.data_parallel_rank, keys)
        self._next += 1
        self._ring.append(batch)
        self._ring_keys += keys
        while len(self._ring) > 1 and (
            len(self._ring) > self.retained_batches or self._ring_keys > self.retained_keys
        ):
            self._ring_keys -= self._ring.popleft().key_count
        self._sealed.notify_all()
        return batch

    def _slice(self, start: int, stop: int | None, limit: int | None = None) -> list[Batch]:
        first = self._oldest()
        start = max(start, first)
        stop = self._next if stop is None else min(stop, self._next)
        if limit is not None:
            stop = min(stop, start + limit)
        return list(islice(self._ring, start - first, stop - first)) if start < stop else []

    def _flush_loop(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._pending:
                    self._pending_arrived.wait()
                    continue
                left = self._pending_since + self.flush_interval - time.monotonic()
                if left > 0:
                    self._pending_arrived.wait(left)
                else:
                    self._seal()

    def _wait_from(self, watch: Watch) -> list[Batch]:
        """The batches from the watch's cursor on; waits while there are none yet."""
        deadline = None if watch.timeout is None else time.monotonic() + watch.timeout
        with self._lock:
            while not watch.cancelled:
                if watch.next_sequence < self._oldest():
                    if not watch.skip_lost:
                        raise SequenceTooOld(watch.next_sequence, self._oldest())
                    watch.lost += self._oldest() - watch.next_sequence
                    watch.next_sequence = self._oldest()
                if watch.next_sequence < self._next:
                    return self._slice(watch.next_sequence, None)
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    break
                self._sealed.wait(left)
            return []

    def _cancel(self, watch: Watch) -> None:
        with self._lock:
            watch.cancelled = True
            self._sealed.notify_all()


class Watch:
    """An iterator over a log's batches in sequence order, without gaps, from a start on.

    It waits for new batches, and ends when cancelled, when the log is closed and read to its
    end, or after `timeout` seconds without a batch (iterate it again to resume). When batches
    it has yet to read were dropped, it raises `SequenceTooOld`, or, with `skip_lost`, jumps to
    the oldest retained batch and adds the batches skipped to `lost`. One thread iterates;
    `cancel()` may come from any thread (a gRPC termination callback, say).
    """

    def __init__(self, log: EventLog, start: int, timeout: float | None, skip_lost: bool) -> None:
        self._log = log
        self._fetched: deque[Batch] = deque()
        self.next_sequence = start  # of the next batch to fetch from the log
        self.timeout = timeout
        self.skip_lost = skip_lost
        self.cancelled = False
        self.lost = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._fetched and not self.cancelled:
            self._fetched.extend(self._log._wait_from(self))
            if self._fetched:
                self.next_sequence = self._fetched[-1].sequence + 1
        if not self._fetched or self.cancelled:
            raise StopIteration
        return self._fetched.popleft()

    def cancel(self) -> None:
        """End the iteration now, waking the thread blocked in it."""
        self._log._cancel(self)


def _key_count(event: KVCacheEvent) -> int:
    return len(event.block_hashes) if isinstance(event, BlockStored | BlockRemoved) else 0


def _int_list(values: Sequence[int]) -> list[int]:
    """Plain ints for msgpack (a numpy array's items are not)."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist else [int(v) for v in values]


def _check(*, minimum: float, **settings: float) -> None:
    for name, value in settings.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
