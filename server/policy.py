"""The node's request policy, done once for every path that moves blocks (shm, tcp, grpc):
who calls and in which key space (kvstore/tenants.py, both ways), what it may do and
within which quota, fetch-through and waits (server/fetch.py), the bytes a request holds
in flight, busy refusals and their count, and what is counted of it (transfers by path,
tenants' reads). A path parses its framing, calls these, and writes the answer.

Bytes in flight (`TransferCounts`, bounded per node and per connection): a get holds the
bytes it found from when they are pinned until its transfer ends (a lease: until it is
released or expires). A put is refused, as if it held them, when the bytes it declares
would pass a bound; it holds them from when they begin to come (its first data; a
shared-memory put: once its slots are reserved for the caller to write) until it ends, so
a put that declares and sends nothing delays no one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from types import TracebackType

from kvstore.errors import Busy, PermissionDenied
from kvstore.ingest import BlockIngest, SlotPut
from kvstore.keys import BlockKey, check_keys
from kvstore.results import PutResult
from kvstore.server.auth import Auth
from kvstore.server.fetch import Fetcher
from kvstore.server.status import TransferCounts
from kvstore.server.tickets import TicketBook
from kvstore.store import ReadBatch, Store
from kvstore.tenants import Header, Tenant, as_asked
from kvstore.tiers import Reservation


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, over which path: what the policy needs of a request besides its content."""

    tenant: Tenant
    path: str  # "shm", "tcp" or "grpc": what transfers are counted under
    connection: object  # bytes in flight are bounded per connection too
    alive: Callable[[], bool] = lambda: True  # false once the caller is gone: waits end


@dataclass(frozen=True, slots=True)
class Ask:
    """What a get, lease or lookup asks for: keys as the caller names them, how long keys[0]
    may take to arrive, whether to fetch from the cluster, and by when the caller wants its
    answer (time.monotonic(); None: it set no deadline)."""

    keys: Sequence[bytes]
    wait_ms: int = 0
    fetch: bool = False
    answer_by: float | None = None


class Reading:
    """The present prefix of a get's keys, named as the caller named them: pinned, and its
    bytes held in flight on `caller`'s connection, until `end`."""

    def __init__(
        self, headers: list[Header], batch: ReadBatch, transfers: TransferCounts, caller: Caller
    ) -> None:
        self.headers = headers
        self.blocks = batch.blocks
        self.truncated = batch.truncated  # stopped before a stored block: ask again
        self.nbytes = sum(b.meta.size for b in batch.blocks)
        self._batch, self._transfers, self._connection = batch, transfers, caller.connection

    @property
    def views(self) -> list[memoryview]:
        return [b.view for b in self.blocks]

    def end(self) -> None:
        self._transfers.give(self.nbytes, self._connection)
        self._batch.close()


class PutSlots:
    """A put whose slots the caller writes itself (shared memory): reserved, and their bytes
    held in flight, until `publish` or `end`."""

    def __init__(self, slots: SlotPut, blocks: list[Header], held: ExitStack) -> None:
        self.blocks = blocks  # as the node names them
        self.present = slots.present  # indexes of blocks already stored: no slot
        self.reservations: list[Reservation] = [slot for *_, slot in slots.slots]
        self.nbytes = sum(slot.size for slot in self.reservations)
        self._slots = slots
        self._held = held

    def publish(self, checksums: Sequence[int], unhashed: bool = False) -> PutResult:
        """Every slot, or none (a checksum that does not match); ended either way."""
        with self._held:
            return self._slots.commit(checksums, unhashed=unhashed)

    def end(self) -> None:
        """Free the slots."""
        self._held.close()


class Put:
    """A put whose bytes come over the path: `declare` its blocks (at once or frame by
    frame), `begin` as its bytes start to come (the first `feed` does), write them with
    `target`/`advance` or `feed`, then `finish`."""

    def __init__(
        self, policy: RequestPolicy, caller: Caller, omit_present: bool, held: ExitStack
    ) -> None:
        self._policy = policy
        self._caller = caller
        self._omit_present = omit_present
        self._held = held
        self._ingest: BlockIngest | None = None
        self._declared: list[tuple[BlockKey, int]] = []  # node keys and sizes, for quotas
        self._sending = False

    @property
    def pending(self) -> int:
        """Bytes declared and not received yet."""
        return self._ingest.pending_bytes if self._ingest is not None else 0

    def declare(self, blocks: Iterable[Header], durable: bool = False) -> list[int]:
        """Blocks as the caller names them; the indexes left out as stored already (with
        `omit_present`: their bytes are not to come). The first call says `durable`."""
        tenant, policy = self._caller.tenant, self._policy
        blocks = tenant.blocks(blocks)
        ingest = self._ingesting(durable)
        self._declared += [(key, meta.size) for key, meta in blocks]
        policy.auth.check(tenant, sum(size for _, size in self._declared))
        if not self._sending:  # refused as if held, with what it declared before
            nbytes = self.pending + sum(meta.size for _, meta in blocks)
            policy.transfers.admit(nbytes, self._caller.connection)
        before = self.pending
        present = ingest.declare(blocks)
        if self._sending:
            self._hold(self.pending - before)
        return present

    def begin(self) -> None:
        """Its bytes come from now on: those it declared are held in flight until it ends."""
        if not self._sending:
            self._sending = True
            self._hold(self.pending)

    def target(self) -> memoryview:
        """Where the next bytes belong (`BlockIngest.target`)."""
        return self._ingesting().target()

    def advance(self, n: int) -> None:
        self._ingesting().advance(n)

    def feed(self, data: memoryview) -> None:
        self.begin()
        self._ingesting().feed(data)  # one copy: frame -> slot

    def abort(self) -> None:
        """Its whole blocks stay; the rest will not come."""
        if self._ingest is not None:
            self._ingest.abort()

    def finish(self) -> PutResult:
        """Every declared block is whole: charged to the tenant, the transfer counted."""
        ingest = self._ingesting()
        result = ingest.finish()
        self._policy.auth.charge(self._caller.tenant, self._declared)
        self._policy.transfers.add(f"put/{self._caller.path}", ingest.received)
        return result

    def _ingesting(self, durable: bool = False) -> BlockIngest:
        if self._ingest is None:
            store = self._policy.store
            self._ingest = BlockIngest(store, omit_present=self._omit_present, durable=durable)
        return self._ingest

    def _hold(self, nbytes: int) -> None:
        transfers, connection = self._policy.transfers, self._caller.connection
        transfers.hold(nbytes, connection)
        self._held.callback(transfers.give, nbytes, connection)


class RequestPolicy:
    def __init__(
        self,
        store: Store,
        auth: Auth,
        transfers: TransferCounts,
        tickets: TicketBook,
        fetcher: Fetcher | None = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.transfers = transfers
        self.tickets = tickets
        self.fetcher = fetcher  # set by the daemon once the cluster is joined
        self._transfer = _CountsBusy(transfers, transfers.running())
        self._counted = _CountsBusy(transfers, nullcontext())

    # -- who calls ----------------------------------------------------------------

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]]) -> Tenant:
        """The tenant (or node) a call's credential proves; Unauthenticated if none."""
        return self.auth.caller(metadata)

    def opened(self, ticket: bytes, host: str | None, proof: bytes, shm: bool) -> Tenant:
        """The tenant whose ticket opens a data connection (`host` None: from this host);
        `shm`: the connection maps the node's arena, which shows every tenant's bytes."""
        tenant = self.tickets.redeem(ticket, host, proof)
        if shm and not tenant.shm:
            raise PermissionDenied(f"tenant {tenant.name!r} may not map this node's memory")
        return tenant

    # -- blocks out ---------------------------------------------------------------

    @contextmanager
    def get(self, caller: Caller, ask: Ask) -> Iterator[Reading]:
        """The present prefix of `ask.keys`, pinned and held while the path sends it."""
        with self._serving():
            reading = self._read(caller, ask)
            try:
                yield reading
            finally:
                reading.end()
        self.transfers.add(f"get/{caller.path}", reading.nbytes)

    def lease(self, caller: Caller, ask: Ask) -> Reading:
        """The same, pinned and held until the caller's lease ends (`Reading.end`)."""
        with self._serving():
            reading = self._read(caller, ask)
        self.transfers.add(f"get/{caller.path}", reading.nbytes)
        return reading

    def lookup(
        self,
        caller: Caller,
        ask: Ask,
        blocking: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> list[str]:
        """Tier of each block of the present prefix. `ask.keys` are checked by the path (a
        lookup may name them or the tokens they hash); one that may wait or fetch does so
        in `blocking` (a path's bound on its threads that may block)."""
        keys = caller.tenant.keys(ask.keys)
        waits = ask.fetch or (ask.wait_ms > 0 and not self.store.contains(keys[0]))
        with blocking() if waits else nullcontext(), self._serving(transfer=False):
            if waits:
                self._ensure(caller, keys, ask)
            return self.store.lookup(keys)

    # -- blocks in ----------------------------------------------------------------

    @contextmanager
    def put(self, caller: Caller, *, omit_present: bool = False) -> Iterator[Put]:
        """A put whose bytes the path receives; on any failure its whole blocks stay."""
        caller.tenant.may_write()
        with self._serving(), ExitStack() as held:
            put = Put(self, caller, omit_present, held)
            try:
                yield put
            except BaseException:
                put.abort()
                raise

    def reserve(self, caller: Caller, blocks: Sequence[Header], durable: bool) -> PutSlots:
        """Slots for the blocks not stored yet, for the caller to write (maybe after a wait
        for room); `commit` publishes them, `PutSlots.end` frees them."""
        tenant = caller.tenant
        with self._serving():
            blocks = tenant.blocks(blocks)
            declared = sum(meta.size for _, meta in blocks)
            self.auth.check(tenant, declared)
            self.transfers.admit(declared, caller.connection)
            slots = SlotPut(self.store, blocks, durable)
            with ExitStack() as held:
                held.callback(slots.abort)  # after a commit: nothing left to free
                nbytes = sum(slot.size for *_, slot in slots.slots)
                held.enter_context(self.transfers.holding(nbytes, caller.connection))
                return PutSlots(slots, blocks, held.pop_all())

    def commit(
        self, caller: Caller, put: PutSlots, checksums: Sequence[int], unhashed: bool = False
    ) -> PutResult:
        """Publish every slot of `put`, or none (a checksum that does not match);
        `unhashed`: blocks with no checksum get theirs here (`SlotPut.commit`)."""
        with self._serving(transfer=False):
            result = put.publish(checksums, unhashed)
        self.auth.charge(caller.tenant, ((key, meta.size) for key, meta in put.blocks))
        self.transfers.add(f"put/{caller.path}", put.nbytes)
        return result

    # -- within -------------------------------------------------------------------

    def _serving(self, transfer: bool = True) -> AbstractContextManager[object]:
        """One request (a transfer, refused while the node drains); its refusals as busy
        counted."""
        return self._transfer if transfer else self._counted

    def _read(self, caller: Caller, ask: Ask) -> Reading:
        asked = check_keys(ask.keys, unique=True)
        keys = caller.tenant.keys(asked)
        self._ensure(caller, keys, ask)
        batch = self.store.pin(keys)
        try:
            found = [(b.key, b.meta.size) for b in batch.blocks]
            self.transfers.hold(sum(size for _, size in found), caller.connection)
        except BaseException:
            batch.close()
            raise
        reading = Reading(
            as_asked(asked, ((b.key, b.meta) for b in batch.blocks)), batch, self.transfers, caller
        )
        try:
            self.auth.read(caller.tenant, len(keys), found)
        except BaseException:
            reading.end()
            raise
        if batch.truncated and not batch.blocks:
            self.transfers.refused_busy()  # no room to bring a stored block up: busy
        return reading

    def _ensure(self, caller: Caller, keys: list[BlockKey], ask: Ask) -> None:
        if self.fetcher is not None:
            self.fetcher.ensure(keys, ask.wait_ms, ask.fetch, caller.alive, ask.answer_by)


class _CountsBusy:
    """Counts the `Busy` refusals leaving its block, then lets them go on (`enter`: a
    context entered first, such as a transfer in flight). A class, not a generator: every
    request enters one."""

    __slots__ = ("enter", "transfers")

    def __init__(self, transfers: TransferCounts, enter: AbstractContextManager[object]) -> None:
        self.transfers, self.enter = transfers, enter

    def __enter__(self) -> None:
        self.enter.__enter__()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.enter.__exit__(kind, value, traceback)
        if kind is not None and issubclass(kind, Busy):
            self.transfers.refused_busy()
