"""The client that serving engines embed: it chooses a transfer path and runs the codec
pipeline; the paths themselves move blocks (kvstore/client/transport.py)."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from operator import methodcaller
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np
import xxhash

from kvstore import codecs
from kvstore.arena import aligned
from kvstore.client import tcp
from kvstore.client.channel import Channels, NodeChanged
from kvstore.client.grpc import CHANNEL_OPTIONS, SERVICE, GrpcTransport
from kvstore.client.pipeline import (
    Block,
    Decoder,
    Encoding,
    Payload,
    Received,
    batches,
    check_batch,
    encoded_parts,
    payload_size,
)
from kvstore.client.security import NodeCaller, Security
from kvstore.client.shm import Fill, Lease, ShmTransport
from kvstore.client.status import error_from_rpc
from kvstore.client.tcp import Place, TcpTransport
from kvstore.client.transport import Arrived, Ask, Out, Transport
from kvstore.errors import (
    Busy,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unsupported,
)
from kvstore.fabric import Region, address
from kvstore.keys import BlockKey, check_keys, check_tokens
from kvstore.limits import BLOCK_OVERHEAD, MAX_BLOCKS, MAX_TOKENS
from kvstore.meta import BlockMeta
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import ChannelError
from kvstore.results import (
    Batch,
    Load,
    Location,
    NodeInfo,
    PushResult,
    PutResult,
    StoreStats,
    TierStats,
)
from kvstore.trust import CHALLENGE, DIALED, ClusterSecret

if TYPE_CHECKING:
    from kvstore.client.nixl import NixlTransport

log = logging.getLogger("kvstore.client")
T = TypeVar("T")
DEFAULT_CHUNK = 1 << 20
TRANSPORTS = ("auto", "shm", "nixl", "tcp", "grpc")
REPROBE_AFTER = 30.0  # seconds before a path that failed is tried again
BUSY_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)  # seconds before each retry of a busy refusal
IN_PLACE_PART = 256 << 20  # bytes per part of an in-place put
IN_PLACE_AHEAD = 2  # parts whose copies may still run while the next part opens


class Client:
    """Batch calls to one node; thread-safe, so one client can serve many threads.

    Prefix semantics: `lookup` counts the leading keys present, `get` returns the leading
    blocks present (fewer than asked at the first missing key, never an error). Errors
    raise `kvstore.KVStoreError` subclasses.

    `transport`: `auto` takes the fastest path the node and this host allow: shared
    memory when client and node share the host (proven, never assumed; `shm=False` leaves
    it out), else the node's TCP data plane, else gRPC. A path that fails is logged once,
    counted (`stats().fallbacks`) and tried again after a while. `shm`, `tcp` or `grpc`
    force one path, and its failures raise.

    `checksum` (on by default): send an xxh3 of every payload (the node verifies it) and
    verify every block got, so a tampered, torn or misdirected block is a `CorruptBlock`.
    `codec` and `layout` are the defaults for puts; gets decode whatever codec each block
    names, in a thread pool over all cores. `codec="auto"` picks the lossless codec that
    pays off on a `link_gbps` link (none when unlimited), once per kind of payload.
    """

    def __init__(
        self,
        address: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float | None = None,
        checksum: bool = True,
        transport: str = "auto",
        shm: bool = True,
        codec: str = "none",
        layout: str = "",
        link_gbps: float | None = None,
        token: str | None = None,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        cluster_secret: ClusterSecret | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise InvalidArgument("transport", f"must be one of {', '.join(TRANSPORTS)}")
        self.address = address
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.checksum = checksum
        self.encoding = Encoding(codec, layout, checksum)
        self.link_gbps = link_gbps
        self.transport = transport
        self._candidates = (
            tuple(p for p in TRANSPORTS[1:] if shm or p != "shm")
            if transport == "auto"
            else (transport,)
        )
        node = NodeCaller(cluster_secret, address) if cluster_secret is not None else None
        self.security = Security.of(token, tls_ca, tls_cert, tls_key, node)
        self._channel = self.security.channel(address, CHANNEL_OPTIONS)
        self._unary = {
            name: self._channel.unary_unary(SERVICE + name)
            for name in ("Lookup", "Delete", "Stats", "Hello", "Push", "Locate", "Prefetch")
        }
        self._watch = self._channel.unary_stream(SERVICE + "Watch")
        self.local_only = ""  # why the last `locate` answer was one node's alone, or ""
        self._pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="kvstore-codec")
        self._auto: dict[tuple, str] = {}
        self._paths: dict[str, Transport] = {}
        self._down: dict[str, float] = {}  # path -> when to try it again
        self._fallbacks: dict[str, int] = {}
        self._info: pb.NodeInfo | None = None
        self._registered: list[object] = []  # memory registered for NIXL: kept alive here
        self._lock = threading.Lock()

    # -- blocks in ----------------------------------------------------------------

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        *,
        codec: str | None = None,
        layout: str | None = None,
        durable: bool = False,
    ) -> PutResult:
        """Store one payload per key (bytes-like or numpy arrays, 1 B and up), encoded with
        `codec` (default: the client's) and recording `layout`. The batch must fit the
        node whole; it goes in parts of one request each, encoded while parts go out.
        `durable`: acknowledged only once on the node's disk (under its fsync policy), for
        blocks that must survive a crash; a node without a disk tier refuses it."""
        keys = check_batch(keys, payloads)
        self._check_fits([payload_size(p) for p in payloads])  # raw: an upper bound
        encoding = self._encoding(codec, layout, payloads)
        parts = encoded_parts(keys, payloads, encoding, self._pool)
        return sum((self._put(*part, durable) for part in parts), PutResult(0, 0))

    def put_blocks(self, blocks: Sequence[Block], views: Sequence[memoryview]) -> PutResult:
        """Put blocks whose metadata is already built (a node forwarding its own)."""
        sent, declared = sum(len(v) for v in views), sum(meta.size for _, meta in blocks)
        if sent != declared:  # refused alike on every path, before anything is sent
            raise InvalidArgument("data", f"{sent} bytes follow, the blocks declare {declared}")
        result = PutResult(0, 0)
        for part in batches([len(v) for v in views], 1 << 62):
            result += self._put(list(blocks[part]), list(views[part]))
        return result

    def put_in_place(
        self,
        keys: Sequence[BlockKey],
        dtype: np.dtype,
        shape: tuple[int, ...],
        fill: Fill,
        *,
        layout: str | None = None,
    ) -> PutResult:
        """Store one block per key, each a `dtype` array of `shape`, that `fill(indexes,
        slots)` writes straight into the node's shared arena: `slots[j]` is the writable
        bytes of block `indexes[j]` (blocks already stored are left out). One copy fewer
        than `put`, for data not yet in host memory (a GPU's). Same host only; no codec.

        Blocks go in parts of `IN_PLACE_PART` bytes. `fill` may start its copies and
        return a wait function instead of finishing them: the part is published after the
        wait, once the next part's slots are handed out, so copies overlap the node's
        bookkeeping. Checksums (if on) are computed by the node from the slots once
        written: one pass over the bytes, not two. If `fill` raises, the node frees the
        part's slots."""
        keys = check_keys(keys, unique=True, limit=len(keys))
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        self._check_fits([size] * len(keys))
        layout = self.encoding.layout if layout is None else layout
        meta = BlockMeta(size, codecs.dtype_name(dtype), tuple(shape), layout)

        def put() -> PutResult:
            shm = self._shm()
            pending: list[Callable[[], PutResult]] = []
            result = PutResult(0, 0)
            for part in batches([size] * len(keys), min(len(shm.arena) // 4, IN_PLACE_PART)):
                blocks = [(key, meta) for key in keys[part]]
                pending.append(shm.put_in_place(blocks, part.start, fill, self.checksum))
                if len(pending) > IN_PLACE_AHEAD:
                    result += pending.pop(0)()
            for commit in pending:
                result += commit()
            return result

        return self._met_again(put)

    def put_from(
        self, keys: Sequence[BlockKey], sources: Sequence[object], *, layout: str = ""
    ) -> PutResult:
        """Store one block per key, each read by the node where it lies: contiguous torch
        tensors (CUDA ones too) or numpy arrays in memory this client registered
        (`register`); dtype and shape recorded, no codec. NIXL only. GPU memory leaves
        through host staging (client/gpu_staging.py says why), where it is hashed."""
        keys = check_keys(keys, unique=True, limit=len(keys))
        if len(sources) != len(keys):
            raise InvalidArgument("sources", f"got {len(sources)} for {len(keys)} keys")
        regions = [address(source) for source in sources]
        self._check_fits([region.size for region in regions])
        blocks = [
            (key, _source_meta(i, source, region, layout, self.checksum))
            for i, (key, source, region) in enumerate(zip(keys, sources, regions, strict=True))
        ]
        return self._on_nixl(lambda nixl: nixl.put_from(blocks, sources))

    # -- blocks out ---------------------------------------------------------------

    def get(
        self,
        keys: Sequence[BlockKey],
        *,
        out: Out = None,
        wait: float | None = None,
        fetch: bool = False,
    ) -> list[np.ndarray]:
        """The payloads of the present prefix of `keys`, in order, with their dtype and shape.

        Without `out`, arrays are fresh memory; with `out`, blocks are written back to back
        into that writable buffer (an engine's staging memory, reused: no allocation). Encoded
        blocks are decoded into new arrays (`out` then holds their encoded bytes).

        `wait`: up to this many seconds for keys still being put (a prefill still writing)
        to arrive; blocks come back as they appear, and a put that fails ends the wait at
        once. `fetch` (a node with `--cluster`): blocks this node lacks are pulled from the
        node holding them. A node that stops short of a stored block (DRAM full of pinned
        blocks) is asked again for the rest, after a pause when it brought none; `Busy`
        if it still brings none after the pauses of a busy refusal.
        """
        keys = check_keys(keys, unique=True, limit=len(keys))
        decoder = Decoder(self._pool, self.checksum)
        got = Received()
        used = 0  # bytes of `out` filled so far
        for ask, last in self._asks(keys, wait, fetch, got.blocks.__len__):
            rest = None if out is None else _flat(out)[used:]
            part = partial(_get_part, ask, rest, decoder.arrived, len(got.blocks))
            received: Received = self._run(part)
            got.arrays.extend(received.arrays)
            got.blocks.extend(received.blocks)
            used += sum(meta.size for _, meta in received.blocks)
            short = len(received.blocks) < len(ask.keys) and not received.truncated
            if short and (last() or not received.blocks):
                break  # a missing key ends the prefix (or nothing came in time)
        return decoder.result(got)

    def get_into(
        self,
        keys: Sequence[BlockKey],
        place: Place,
        landed: Callable[[int], None],
    ) -> int:
        """The present prefix of `keys` received straight into memory `place(blocks)` hands
        out (one writable buffer per block, given their keys and metadata), `landed(i)`
        called as block i is whole, in order. Returns how many landed: a connection lost
        half way leaves those before it landed, whole. Checksums are the caller's to check
        (over NIXL, the node checks blocks bound for GPU memory). TCP, shared memory or
        NIXL (the paths that write straight into place); once this client registered
        memory (`register`), over NIXL, and every place must lie in what it registered
        (host memory, or GPU memory: staged and checked in host memory first)."""
        keys = check_keys(keys, unique=True)
        if self._registered:  # places lie in registered memory: NIXL writes them there
            return self._on_nixl(lambda nixl: nixl.get_into(Ask(keys), place, landed))
        started = False

        def placed(blocks: list[Block]) -> list[memoryview]:
            nonlocal started
            started = True
            return place(blocks)

        def over_socket() -> int:
            channels = getattr(self._transport(), "channels", None)  # tcp, shm and nixl's
            if channels is None:
                raise Unsupported("get_into needs the node's data plane (tcp, shm or nixl)")
            try:
                return tcp.get_into(channels, Ask(keys), placed, landed)
            except ChannelError as exc:
                if started:  # what landed stays landed: it must not start again
                    raise Unavailable(f"data connection lost as blocks landed: {exc}") from None
                raise

        return self._met_again(over_socket)

    def prefetch(self, keys: Sequence[BlockKey]) -> int:
        """Have the node start pulling what it lacks of `keys` from the cluster, and return at
        once: how many leading keys it held already."""
        request = pb.GetRequest(keys=check_keys(keys), fetch=True)
        return pb.PrefetchReply.FromString(self._call("Prefetch", request)).present

    def lease(
        self, keys: Sequence[BlockKey], *, wait: float | None = None, fetch: bool = False
    ) -> Lease:
        """Zero-copy, read-only views of the present prefix of `keys` in the node's shared
        arena, pinned until released (use `with`); renewed while this process lives. Same
        host only. `wait` and `fetch` as for `get` (for the first key: a lease is one
        request). `lease.truncated`: the node stopped short of a stored block."""
        ask = Ask(check_keys(keys, unique=True), _millis(wait), fetch)
        return self._met_again(lambda: self._shm().lease(ask))

    def register(self, buffer: object) -> None:
        """Register memory an engine reuses (a contiguous host buffer, or a CUDA tensor) with
        this client's NIXL agent, once: gets into it (`out=`) and puts of views of it then
        move straight between it and the node, with no copy in this process. NIXL only.
        Kept (and referenced) for the client's life, and registered again with the agent
        of each new session (the node restarted, or the path was left and taken again)."""
        self._on_nixl(lambda nixl: nixl.register(buffer))
        with self._lock:
            self._registered.append(buffer)

    def shared_arena(self) -> np.ndarray | None:
        """The node's arena as mapped here, or None when the node is not on this host."""
        try:
            return self._shm().arena
        except (Unsupported, Unavailable):
            return None

    # -- queries and control ----------------------------------------------------

    def lookup(
        self, keys: Sequence[BlockKey], *, wait: float | None = None, fetch: bool = False
    ) -> int:
        """How many leading keys are present (`wait`, `fetch`: as for `get`)."""
        return len(self.lookup_tiers(keys, wait=wait, fetch=fetch))

    def lookup_tiers(
        self, keys: Sequence[BlockKey], *, wait: float | None = None, fetch: bool = False
    ) -> list[str]:
        """The tier holding each block of the present prefix, e.g. ["host", "disk"]."""
        keys = check_keys(keys, limit=len(keys))
        tiers: list[str] = []
        for ask, last in self._asks(keys, wait, fetch, tiers.__len__):
            found = self._run(methodcaller("lookup", ask))
            tiers.extend(found)
            if len(found) < len(ask.keys) and (last() or not found):
                break
        return tiers

    def lookup_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> int:
        """How many leading full blocks of a prompt are present, hashed by the node."""
        tokens = pb.TokenPrefix(
            token_ids=check_tokens(token_ids, limit=MAX_TOKENS).astype(np.uint32),
            block_size=block_size,
            salt=salt,
        )
        return pb.LookupReply.FromString(
            self._call("Lookup", pb.LookupRequest(tokens=tokens))
        ).found

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Remove blocks; returns how many were present."""
        keys = check_keys(keys, limit=len(keys))
        deleted = 0
        for start in range(0, len(keys), MAX_BLOCKS):
            request = pb.DeleteRequest(keys=keys[start : start + MAX_BLOCKS])
            deleted += pb.DeleteReply.FromString(self._call("Delete", request)).deleted
        return deleted

    def push(self, keys: Sequence[BlockKey], target: str, transport: str = "auto") -> PushResult:
        """Ask this node to send the present prefix of `keys` to node `target` (HOST:PORT),
        node to node over the target's data plane (`tcp`; `auto` falls back to `grpc`)."""
        request = pb.PushRequest(keys=check_keys(keys), target=target, transport=transport)
        reply = pb.PushReply.FromString(self._call("Push", request))
        return PushResult(reply.found, reply.stored, reply.existed)

    def locate(self, keys: Sequence[BlockKey]) -> list[Location]:
        """Which nodes hold how much of these chained keys' prefix, by tier, with their
        load and a score, best first (the cluster's answer from its location index; this
        node's alone when it runs without one or cannot reach it: see `local_only`)."""
        request = pb.LookupRequest(keys=pb.GetRequest(keys=check_keys(keys)))
        return self._located(request)

    def locate_tokens(
        self, token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes
    ) -> list[Location]:
        """`locate` of a prompt's full blocks, hashed by the node."""
        tokens = pb.TokenPrefix(
            token_ids=check_tokens(token_ids, limit=MAX_TOKENS).astype(np.uint32),
            block_size=block_size,
            salt=salt,
        )
        return self._located(pb.LookupRequest(tokens=tokens))

    def watch(self, from_sequence: int | None = None) -> Iterator[Batch]:
        """This node's KV event batches (vLLM's stream), in order with no gaps, from
        `from_sequence` on (None: from now); ends when the call is cancelled or the node
        goes. `SequenceTooOld` (an `OutOfRange`) when the node no longer holds it."""
        from kvstore.events.schema import decode_batch  # msgspec and the event types: here only

        request = pb.WatchRequest()
        if from_sequence is not None:
            request.from_sequence = from_sequence
        try:
            for raw in self._watch(
                request.SerializeToString(), timeout=self.timeout, metadata=self.security.metadata
            ):
                reply = pb.EventBatch.FromString(raw)
                batch = decode_batch(reply.payload)
                yield Batch(reply.sequence, batch.ts, tuple(batch.events), batch.data_parallel_rank)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def stats(self) -> StoreStats:
        """The node's counters, and (`fallbacks`) how often this client left a path."""
        reply = pb.StatsReply.FromString(self._call("Stats", pb.StatsRequest()))
        fields = TierStats.__slots__
        tiers = tuple(TierStats(**{f: getattr(t, f) for f in fields}) for t in reply.tiers)
        with self._lock:
            fallbacks = dict(self._fallbacks)
        return StoreStats(
            fetched_blocks=dict(reply.fetched_blocks),
            fetched_bytes=dict(reply.fetched_bytes),
            tiers=tiers,
            puts=reply.puts,
            gets=reply.gets,
            lookups=reply.lookups,
            uptime_s=reply.uptime_s,
            transfers=dict(reply.transfers),
            fallbacks=fallbacks,
            tenant=reply.tenant,
            tenant_blocks=reply.tenant_blocks,
            tenant_bytes=reply.tenant_bytes,
            quota=reply.quota,
        )

    def _located(self, request: pb.LookupRequest) -> list[Location]:
        reply = pb.LocateReply.FromString(self._call("Locate", request))
        self.local_only = reply.local_only  # why the last answer was one node's, or ""
        return [
            Location(
                n.node_id,
                n.address,
                n.data_address,
                n.matched,
                dict(n.tiers),
                Load(n.load.inflight, n.load.bytes_per_s),
                n.score,
            )
            for n in reply.nodes
        ]

    def node_info(self) -> NodeInfo:
        info = self._node()
        return NodeInfo(
            info.node_id,
            info.instance,
            info.data_address,
            info.unix_address,
            info.capacity,
            info.host_capacity,
            info.max_block_size,
            info.max_blocks,
            info.nixl,
        )

    @property
    def path(self) -> str:
        """The transfer path block operations take now."""
        return self._transport().name

    def close(self) -> None:
        with self._lock:
            paths, self._paths = list(self._paths.values()), {}
        for path in paths:
            path.close()
        self._pool.shutdown(wait=False)
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ------------------------------------------------------------------

    def _run(self, operation: Callable[[Transport], T]) -> T:
        """Run a block operation on the current path. If the path itself fails (refused,
        unreachable, a connection lost), log it once, count it, and run the operation
        again on the next path: every block operation is safe to repeat. A busy node's
        refusal is retried on the same path (`busy_retried`)."""
        restarted = retried = False
        while True:
            transport = self._transport()
            try:
                return busy_retried(partial(operation, transport))
            except NodeChanged:
                if restarted:
                    raise
                restarted = True
                self._forget_node()  # meet the node anew, on every path
            except ChannelError as exc:  # a pooled connection the node dropped, most often
                if not retried:
                    retried = True
                    continue
                if self.transport != "auto":
                    raise
                self._leave(transport.name, exc)
            except Unavailable as exc:
                if self.transport != "auto" or transport.name == "grpc":
                    raise
                self._leave(transport.name, exc)

    def _transport(self) -> Transport:
        for name in self._candidates:
            with self._lock:
                if name in self._paths:
                    return self._paths[name]
                if self._down.get(name, 0) > time.monotonic():
                    continue
            try:
                opened = self._open(name)
            except (Unsupported, Unavailable) as exc:
                if self.transport != "auto" or self._info is None:
                    raise  # forced, or the node itself could not be met: no path will do
                self._leave(name, exc)
                continue
            with self._lock:
                existing = self._paths.setdefault(name, opened)
            if existing is not opened:
                opened.close()
            return existing
        raise Unavailable(f"no transfer path to {self.address}")  # grpc is always tried

    def _open(self, name: str) -> Transport:
        if self.security.node is not None:
            self._node()  # the peer proves itself before any call
        if name == "grpc":
            return GrpcTransport(
                self._channel, self.chunk_size, self.timeout, self.security.metadata
            )
        info = self._node()
        if name == "nixl":
            _nixl_here(info)  # before any connection is opened for it
        host = self.address.rpartition(":")[0].strip("[]")
        kind = "unix" if name == "shm" else "tcp"
        channels = Channels(kind, self._hello, info, host, self.timeout, self.security)
        if name == "shm":
            return ShmTransport(channels, self.checksum, self._pool)
        if name == "nixl":
            return self._nixl_opened(channels, info)
        return TcpTransport(channels)

    def _nixl_opened(self, channels: Channels, info: pb.NodeInfo) -> NixlTransport:
        """A NIXL session, with the memory registered before (for an earlier session)."""
        from kvstore.client.nixl import NixlTransport  # NIXL is optional: loaded here only

        try:
            nixl = NixlTransport(channels, info.host_capacity)
        except ResourceExhausted as exc:  # the tenant's sessions are all taken
            channels.close()
            raise Unavailable(f"no NIXL session to be had: {exc}") from None
        with self._lock:
            registered = list(self._registered)
        try:
            if registered:
                nixl.register(*registered)
        except BaseException:
            nixl.close()
            raise
        return nixl

    def _leave(self, name: str, exc: Exception) -> None:
        with self._lock:
            path = self._paths.pop(name, None)
            self._down[name] = time.monotonic() + REPROBE_AFTER
            self._fallbacks[name] = self._fallbacks.get(name, 0) + 1
            first = self._fallbacks[name] == 1
        if path is not None:
            path.close()
        failed = not isinstance(exc, Unsupported)  # not a path the node offers: no alarm
        (log.warning if first and failed else log.info)(
            "kvstore %s: leaving the %s path for %gs: %s", self.address, name, REPROBE_AFTER, exc
        )

    def _shm(self) -> ShmTransport:
        """The shared-memory path, which leases and in-place puts need."""
        if "shm" not in self._candidates:
            raise Unsupported("shared memory needs transport auto or shm, with shm=True")
        return self._path("shm", "shared memory needs a node on this host")  # type: ignore[return-value]

    def _on_nixl(self, operation: Callable[[NixlTransport], T]) -> T:
        """`operation` on the NIXL path (a session that ended is met anew)."""
        return self._met_again(lambda: operation(self._nixl()))

    def _met_again(self, operation: Callable[[], T]) -> T:
        """`operation`, run again as `_run` runs the operations that choose their path: once
        after a pooled connection the node dropped (it restarted, or closed an idle one), and
        once on the node met anew if it restarted since it was last met."""
        lost = restarted = False
        while True:
            try:
                return operation()
            except NodeChanged:
                if restarted:
                    raise
                restarted = True
                self._forget_node()
            except ChannelError:
                if lost:
                    raise
                lost = True

    def _nixl(self) -> NixlTransport:
        """The NIXL path, which registered memory needs."""
        if "nixl" not in self._candidates:
            raise Unsupported("registered memory needs transport auto or nixl")
        return self._path("nixl", "registered memory needs NIXL")  # type: ignore[return-value]

    def _path(self, name: str, needs: str) -> Transport:
        """Path `name`, open (opened now if need be) whichever path the client takes."""
        with self._lock:
            if name in self._paths:
                return self._paths[name]
        try:
            opened = self._open(name)
        except (Unsupported, Unavailable) as exc:
            raise Unsupported(f"{needs}: {exc}") from None
        with self._lock:
            existing = self._paths.setdefault(name, opened)
        if existing is not opened:
            opened.close()
        return existing

    def _forget_node(self) -> None:
        with self._lock:
            paths, self._paths, self._info = list(self._paths.values()), {}, None
        for path in paths:
            path.close()

    def _node(self) -> pb.NodeInfo:
        if self._info is None:
            self._info = self._hello()
        return self._info

    def _hello(self) -> pb.NodeInfo:
        node = self.security.node
        if node is None:
            return pb.NodeInfo.FromString(self._call("Hello", pb.HelloRequest()))
        challenge, dialed = node.challenge()
        asked = ((CHALLENGE, challenge.hex()), (DIALED, dialed))
        try:  # no credential on this call: the peer has proven nothing yet
            proved = pb.NodeInfo.FromString(
                self._unary["Hello"](b"", timeout=self.timeout, metadata=asked)
            )
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            if isinstance(error, Unavailable):
                raise error from None
            raise PermissionDenied(
                f"{dialed} did not prove it is a node of this cluster: {error}"
            ) from None
        node.check(proved.proof, challenge, proved.node_id, proved.instance)
        info = pb.NodeInfo.FromString(self._call("Hello", pb.HelloRequest()))
        if info.instance != proved.instance:
            raise NodeChanged(f"{dialed} restarted while it proved itself")
        return info

    # -- helpers ----------------------------------------------------------------

    def _asks(
        self, keys: list[BlockKey], wait: float | None, fetch: bool, done: Callable[[], int]
    ) -> Iterator[tuple[Ask, Callable[[], bool]]]:
        """The requests of a get or lookup: the keys not had yet (`done()` of them), at
        most a request's worth, each with the wait left; and whether time is up."""
        deadline = time.monotonic() + wait if wait else 0.0

        def last() -> bool:
            return time.monotonic() >= deadline

        while (n := done()) < len(keys):
            left = deadline - time.monotonic()
            yield Ask(keys[n : n + MAX_BLOCKS], _millis(left) if wait else 0, fetch), last

    def _put(
        self, blocks: list[Block], views: list[memoryview], durable: bool = False
    ) -> PutResult:
        return self._run(methodcaller("put", blocks, views, durable))

    def _check_fits(self, sizes: Sequence[int]) -> None:
        """A put must fit the node whole, or its last blocks would evict its first. Each
        block takes a page-aligned slot and its index entry (`HostTier.slot_cost`)."""
        need = sum(aligned(size) + BLOCK_OVERHEAD for size in sizes)
        capacity = self._node().capacity
        if need > capacity:
            raise ResourceExhausted(
                f"blocks: {len(sizes)} blocks take {need} bytes of the node's slots (a slot is "
                f"at least 4 KiB), more than its capacity of {capacity}: put smaller batches"
            )

    def _encoding(self, codec: str | None, layout: str | None, payloads: Sequence) -> Encoding:
        """The encoding of a put, with `auto` resolved for its first payload's kind."""
        encoding = self.encoding.with_overrides(codec, layout)
        if encoding.codec != "auto":
            return encoding
        sample = payloads[0] if payloads else b""
        array = sample if isinstance(sample, np.ndarray) else np.frombuffer(sample, np.uint8)
        kind = (array.dtype.str, array.shape, encoding.layout)
        if kind not in self._auto:
            cores = os.cpu_count() or 2
            self._auto[kind] = codecs.choose(array, encoding.layout, self.link_gbps, cores)
        return replace(encoding, codec=self._auto[kind])

    def _call(self, name: str, request: object) -> bytes:
        if self.security.node is not None and name != "Hello":
            self._node()  # the peer proves itself before any call
        if hasattr(request, "SerializeToString"):
            request = request.SerializeToString()

        def call() -> bytes:
            try:
                return self._unary[name](
                    request, timeout=self.timeout, metadata=self.security.metadata
                )
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from None

        return busy_retried(call)


def _nixl_here(info: pb.NodeInfo) -> None:
    """Unsupported, saying why, unless both the node and this host have NIXL."""
    from kvstore import fabric  # NIXL is optional: loaded here only

    if not info.nixl:
        raise Unsupported("the node offers no NIXL (--nixl off, or not installed there)")
    if fabric.why_not():
        raise Unsupported(fabric.why_not())


def busy_retried(call: Callable[[], T]) -> T:
    """`call`, made again after a growing pause each time the node refuses it as `Busy`
    (refused before it took anything: the same request may pass once the node has room),
    up to `len(BUSY_BACKOFF)` times. The one layer that retries a refusal: any other,
    a quota's included, reaches the caller at once."""
    for pause in BUSY_BACKOFF:
        try:
            return call()
        except Busy:
            time.sleep(pause * random.uniform(0.5, 1.0))  # jittered: refused callers spread out
    return call()


def _get_part(ask: Ask, out: Out, arrived: Arrived, had: int, transport: Transport) -> Received:
    """One request of a get. A node that holds the next block but brought none up (its DRAM
    full of pinned blocks) is busy: retried as any busy refusal."""
    received = transport.get(ask, out, arrived)
    if received.truncated and not received.blocks:
        raise Busy(
            f"the node holds block {had} but had no room in DRAM to serve it (its host tier "
            "is full of pinned blocks): retry"
        )
    return received


def _millis(seconds: float | None) -> int:
    return max(0, min(int((seconds or 0) * 1000), 1 << 31))


def _source_meta(
    index: int, source: object, region: Region, layout: str, checksum: bool
) -> BlockMeta:
    """A `put_from` source's metadata: numpy's name for its dtype (torch's bfloat16 is
    ml_dtypes' bfloat16), its shape, and an xxh3 of host memory (GPU memory: the node's)."""
    torch_dtype = str(getattr(source, "dtype", "")).removeprefix("torch.")
    dtype = source.dtype if isinstance(source, np.ndarray) else codecs.parse_dtype(torch_dtype)
    if dtype is None or not hasattr(source, "shape"):
        raise InvalidArgument(f"sources[{index}]", "not a numpy array or torch tensor")
    digest = 0
    if checksum and not region.vram:
        digest = xxhash.xxh3_64_intdigest((ctypes.c_ubyte * region.size).from_address(region.addr))
    shape = tuple(source.shape)
    return BlockMeta(region.size, codecs.dtype_name(dtype), shape, layout, checksum=digest)


def _flat(out: memoryview | np.ndarray) -> np.ndarray:
    array = out if isinstance(out, np.ndarray) else np.frombuffer(out, np.uint8)
    if not (array.flags.c_contiguous and array.flags.writeable):
        raise InvalidArgument("out", "must be a writable, contiguous buffer")
    return array.reshape(-1).view(np.uint8)
