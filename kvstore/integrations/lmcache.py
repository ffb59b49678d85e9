"""kvstore as an L2 adapter of LMCache's multi-process mode (LMCache 0.5.6), loaded by module
path:

    lmcache server --l2-adapter '{"type": "plugin", "module_path": "kvstore.integrations.lmcache",
        "class_name": "KVStoreL2Adapter", "adapter_params": {"address": "127.0.0.1:7600"}}'

LMCache hands every task to `submit_*` and waits on three event fds; the work runs on a few
threads of the adapter's own, one batched client call per task, and every node failure ends
as a failed task or a miss (`NodeGuard`), never as an exception in LMCache's controllers.

- Keys: an LMCache object key is `blake2b(model@rank@group@chunk hash@cache salt)`, keyed by
  a salt naming the adapter and its `tenant`, 16 bytes: the node's block key.
- Order: LMCache's keys come as rows (one per rank and object group) of chunks; kvstore
  answers prefixes, so lookups and loads ask chunk by chunk across the rows (every row's
  first chunk, then every row's second...): the prefix found is the chunks LMCache can use.
- Lock: on the node's host, a lookup-and-lock takes a kvstore lease over the prefix found
  (the node keeps those blocks in its arena, unevicted, until released), and a load copies
  from the leased views: no round trip, no second checksum pass, one copy into LMCache's
  memory. A lease is released once every key it locked is unlocked; an unlock is local
  bookkeeping, so it completes even when the node restarted (its leases died with it) or
  is gone. Over TCP (the node on another host) the node pins nothing for a client: a
  lookup-and-lock is a lookup, and a block evicted before its load is a 0 in the load's
  bitmap, which LMCache treats as a miss. Keys not under a lease load with one `get_into`
  straight into LMCache's buffers, checked against their checksums.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import xxhash
from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import AdapterUsage, L2AdapterInterface
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.platform import create_event_notifier

from kvstore.client import Client
from kvstore.client.shm import Lease
from kvstore.errors import CorruptBlock, LeaseExpired
from kvstore.integrations.common import NodeGuard, check_settings
from kvstore.keys import name_key, namespace_salt

log = logging.getLogger("kvstore.integrations.lmcache")
T = TypeVar("T")
TaskId = int
TRANSPORTS = ("auto", "shm", "tcp")  # loads write LMCache's buffers from the data plane
DEFAULT_NODE = "127.0.0.1:7600"


@dataclass(frozen=True)
class KVStoreL2AdapterConfig(L2AdapterConfigBase):
    """`adapter_params` (all optional; an unknown key is an error). LMCache finds this class
    by its name (the adapter's class name + "Config").

    - `address`: the node's gRPC address (else `KVSTORE_ADDRESS`, else 127.0.0.1:7600).
    - `token`: the node's tenant token (else `KVSTORE_TOKEN`: LMCache logs its config).
    - `tenant`: a name mixed into every key, so LMCache deployments that share a token (or a
      node without tokens) never share blocks by accident.
    - `transport`: `auto` (shared memory on the node's host, else its TCP data plane),
      `shm` or `tcp`.
    - `timeout_s`: the longest one call to the node may take; `retry_after_s`: after a
      failure the node is left alone this long (tasks fail at once, lookups miss).
    - `workers`: threads running tasks; `checksum`: xxh3 checksums on what moves.
    """

    address: str = field(default_factory=lambda: os.environ.get("KVSTORE_ADDRESS", DEFAULT_NODE))
    token: str | None = None
    tenant: str = ""
    transport: str = "auto"
    timeout_s: float = 5.0
    retry_after_s: float = 10.0
    workers: int = 4
    checksum: bool = True

    def __post_init__(self) -> None:
        check_settings(
            self.transport, TRANSPORTS, timeout_s=self.timeout_s, retry_after_s=self.retry_after_s
        )
        if self.workers < 1:
            raise ValueError("workers: must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> KVStoreL2AdapterConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"kvstore adapter_params: unknown {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def help(cls) -> str:
        return cls.__doc__ or ""


class KVStoreL2Adapter(L2AdapterInterface):
    """LMCache's `L2AdapterInterface` over one kvstore node; thread-safe (LMCache's store
    and prefetch controllers call it from their own threads)."""

    def __init__(self, config: KVStoreL2AdapterConfig, l1_memory_desc: object = None) -> None:
        """`l1_memory_desc` (LMCache's memory, for adapters that register it) is not needed:
        the client copies into whatever memory each task names."""
        super().__init__()  # no capacity: the node evicts on its own (LRU, demotion to disk)
        self.config = config
        self._salt = namespace_salt(engine="lmcache", tenant=config.tenant)
        self._guard = NodeGuard(
            config.address,
            "lmcache",
            config.retry_after_s,
            transport=config.transport,
            timeout=config.timeout_s,
            checksum=config.checksum,
            token=config.token,
        )
        self._store_done = create_event_notifier()
        self._lookup_done = create_event_notifier()
        self._load_done = create_event_notifier()
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="kvstore-l2")
        self._lock = threading.Lock()
        self._task_ids = itertools.count()
        self._stores: dict[TaskId, L2StoreResult] = {}
        self._lookups: dict[TaskId, Bitmap] = {}
        self._loads: dict[TaskId, Bitmap] = {}
        self._locks: dict[bytes, list[tuple[Lease, int]]] = {}  # block key -> (lease, index)
        self._holds: dict[Lease, int] = {}  # lease -> its keys still locked, loads reading it
        self._closed = False

    # -- event fds --------------------------------------------------------------------

    def get_store_event_fd(self) -> int:
        return self._store_done.fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._lookup_done.fileno()

    def get_load_event_fd(self) -> int:
        return self._load_done.fileno()

    # -- store ------------------------------------------------------------------------

    def submit_store_task(self, keys: list[ObjectKey], objects: list[Any]) -> TaskId:
        failed = L2StoreResult(False, 0)
        return self._submit(self._store, self._stores, self._store_done, failed, keys, objects)

    def pop_completed_store_tasks(self) -> dict[TaskId, L2StoreResult]:
        with self._lock:
            done, self._stores = self._stores, {}
        return done

    def _store(self, keys: list[ObjectKey], objects: list[Any]) -> L2StoreResult:
        pairs = zip(keys, objects, strict=True)
        batch = {self.block_key(key): host_bytes(obj) for key, obj in pairs}
        payloads = list(batch.values())
        if not batch:
            return L2StoreResult(True, 0)

        def put(client: Client) -> int:
            result = client.put(list(batch), payloads)
            return result.stored + result.existed

        acknowledged = self._call("store", put, 0)
        if acknowledged < len(batch):
            return L2StoreResult(False, 0)
        self._notify_keys_stored(keys, [obj.get_size() for obj in objects])
        return L2StoreResult(True, sum(p.nbytes for p in payloads))

    # -- lookup and lock --------------------------------------------------------------

    def submit_lookup_and_lock_task(
        self, keys: list[ObjectKey], group_layout_descs: dict[int, Any]
    ) -> TaskId:
        missed = Bitmap(len(keys))
        return self._submit(self._lookup_and_lock, self._lookups, self._lookup_done, missed, keys)

    def query_lookup_and_lock_result(self, task_id: TaskId) -> Bitmap | None:
        with self._lock:
            return self._lookups.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        """Local bookkeeping only, so it always completes: a lease whose keys are all
        unlocked is released (the release rides with the client's next request, or its
        keeper's; a lease of a node that restarted or went is already gone with it)."""
        try:
            unlocked: list[Lease] = []
            with self._lock:
                for block in map(self.block_key, keys):
                    held = self._locks.get(block)
                    if not held:
                        continue  # never locked: a miss, or locked over TCP
                    unlocked.append(held.pop(0)[0])
                    if not held:
                        del self._locks[block]
            self._let_go(unlocked)
        except Exception:  # LMCache never retries an unlock: log whatever it was, never raise
            log.exception("kvstore: unlocking %d keys failed", len(keys))

    def _let_go(self, leases: list[Lease]) -> None:
        """Drop one hold on each of `leases` (a locked key, or a load copying from it) and
        release those that have none left."""
        released = []
        with self._lock:
            for lease in leases:
                self._holds[lease] -= 1
                if not self._holds[lease]:
                    del self._holds[lease]
                    released.append(lease)
        for lease in released:
            lease.release()

    def _lookup_and_lock(self, keys: list[ObjectKey]) -> Bitmap:
        asked = self._in_chunk_order(keys)
        blocks = list(asked)
        if not blocks:
            return Bitmap(len(keys))

        def lock(client: Client) -> tuple[int, Lease | None]:
            if client.path != "shm":  # another host: nothing to pin
                return client.lookup(blocks), None
            lease = client.lease(blocks)
            return len(lease), lease

        nothing: tuple[int, Lease | None] = (0, None)
        found, lease = self._call("lookup", lock, nothing)
        if lease is not None:
            with self._lock:
                for index, block in enumerate(blocks[:found]):
                    self._locks.setdefault(block, []).append((lease, index))
                if found:
                    self._holds[lease] = found
            if not found:
                lease.release()
        return bitmap(len(keys), (i for block in blocks[:found] for i in asked[block]))

    # -- load -------------------------------------------------------------------------

    def submit_load_task(self, keys: list[ObjectKey], objects: list[Any]) -> TaskId:
        missed = Bitmap(len(keys))
        return self._submit(self._load, self._loads, self._load_done, missed, keys, objects)

    def query_load_result(self, task_id: TaskId) -> Bitmap | None:
        with self._lock:
            return self._loads.pop(task_id, None)

    def _load(self, keys: list[ObjectKey], objects: list[Any]) -> Bitmap:
        asked = self._in_chunk_order(keys)
        targets = {block: [host_bytes(objects[i]) for i in at] for block, at in asked.items()}
        loaded = self._copy_leased(targets)
        rest = [block for block in asked if block not in loaded]
        if rest:
            loaded |= self._call("load", lambda client: receive(client, rest, targets), set())
        self._notify_keys_accessed([keys[i] for block in loaded for i in asked[block]])
        return bitmap(len(keys), (i for block in loaded for i in asked[block]))

    def _copy_leased(self, targets: dict[bytes, list[np.ndarray]]) -> set[bytes]:
        """Copy the blocks this adapter holds leases on into their targets; which it did
        (a lease that expired, or whose node restarted, copies nothing)."""
        with self._lock:  # held while copying: an unlock meanwhile cannot release them
            held = {block: self._locks[block][0] for block in targets if self._locks.get(block)}
            for lease, _ in held.values():
                self._holds[lease] += 1
        copied = set()
        try:
            for block, (lease, index) in held.items():
                try:
                    view = lease.blocks[index].reshape(-1).view(np.uint8)
                except LeaseExpired:
                    continue  # the node restarted, or the lease ran out: received instead
                if all(view.nbytes == target.nbytes for target in targets[block]):
                    for target in targets[block]:
                        np.copyto(target, view)  # one copy: the node's arena -> LMCache's
                    if lease.active:  # else it ended mid-copy: the bytes may be another's
                        copied.add(block)
        finally:
            self._let_go([lease for lease, _ in held.values()])
        return copied

    # -- the optional rest of the interface --------------------------------------------

    def delete(self, keys: list[ObjectKey]) -> None:
        blocks = list(dict.fromkeys(self.block_key(key) for key in keys))
        if self._call("delete", lambda client: client.delete(blocks), None) is not None:
            self._notify_keys_deleted(keys, [0] * len(keys))  # sizes: the node does not say

    def get_usage(self) -> AdapterUsage:
        """The node's own figures (its tenant's, where it has tenants): bytes held and
        capacity. LMCache's usage-driven eviction stays off (the adapter declares no
        capacity): the node evicts least recently used blocks itself."""
        stats = self._call("stats", lambda client: client.stats(), None)
        if stats is None:
            return AdapterUsage(0, 0, MappingProxyType({}))
        if stats.tenant:
            return AdapterUsage(stats.tenant_bytes, stats.quota, MappingProxyType({}))
        used = sum(tier.bytes for tier in stats.tiers)
        return AdapterUsage(used, sum(tier.capacity for tier in stats.tiers), MappingProxyType({}))

    def report_status(self) -> dict:
        with self._lock:
            leases, locked = len(self._holds), sum(len(h) for h in self._locks.values())
        return {
            "is_healthy": self._guard.available() and not self._closed,
            "type": "kvstore",
            "address": self.config.address,
            "leases": leases,
            "locked_keys": locked,
            "counts": {k: n for k, n in self._guard.counts.items() if n},  # failed, skipped
        }

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            leases, self._holds, self._locks = list(self._holds), {}, {}
        for lease in leases:
            lease.release()
        self._guard.close()
        for notifier in (self._store_done, self._lookup_done, self._load_done):
            notifier.close()

    # -- keys, tasks and calls ---------------------------------------------------------

    def block_key(self, key: ObjectKey) -> bytes:
        """The node's key of an LMCache object: its fields joined as LMCache's own adapters
        join them ('@' cannot occur in a model name or a cache salt), hashed with the salt."""
        text = (
            f"{key.model_name}@{key.kv_rank:x}@{key.object_group_id:x}"
            f"@{key.chunk_hash.hex()}@{key.cache_salt}"
        )
        return name_key(text, self._salt)

    def _in_chunk_order(self, keys: list[ObjectKey]) -> dict[bytes, list[int]]:
        """Block key -> the indexes of `keys` it stands for, in the order kvstore is asked:
        chunk by chunk across LMCache's rows (a row: one rank and object group)."""
        seen: dict[tuple, int] = {}
        chunk = []
        for key in keys:
            row = (key.model_name, key.kv_rank, key.object_group_id, key.cache_salt)
            chunk.append(seen.setdefault(row, 0))
            seen[row] += 1
        asked: dict[bytes, list[int]] = {}
        for i in sorted(range(len(keys)), key=chunk.__getitem__):  # stable: rows keep order
            asked.setdefault(self.block_key(keys[i]), []).append(i)
        return asked

    def _submit(
        self, work: Callable[..., T], results: dict[TaskId, T], done: Any, failed: T, *args: Any
    ) -> TaskId:
        """Run `work(*args)` on the adapter's threads; its result (`failed` if it raised, or
        the adapter is closed) lands in `results` under a new task id, and `done` is
        signalled: every task completes (but those `close` cancels)."""
        task_id = next(self._task_ids)

        def run() -> None:
            result = failed
            try:
                result = work(*args)
            except Exception:  # not the node's failure (the guard takes those): a bug, logged
                log.exception("kvstore: an LMCache task failed")
            with self._lock:
                results[task_id] = result
            done.notify()

        try:
            self._pool.submit(run)
        except RuntimeError:  # closed: nothing runs any more, and no fd is left to signal
            with self._lock:
                results[task_id] = failed
        return task_id

    def _call(self, doing: str, operation: Callable[[Client], T], fallback: T) -> T:
        """`operation(client)`, or `fallback` when the node fails (logged and counted by the
        guard) or a block fails its checksum (that task's miss: the node is not to blame)."""

        def attempt() -> T:
            try:
                return operation(self._guard.client)
            except CorruptBlock as exc:
                log.warning("kvstore: %s: %s: a miss", doing, exc)
                return fallback

        return self._guard.call(doing, attempt, fallback)


def receive(client: Client, blocks: list[bytes], targets: dict[bytes, list[np.ndarray]]) -> set:
    """The present prefix of `blocks` received straight into their targets (one copy:
    kernel -> LMCache's memory), each checked against its checksum; which arrived whole."""
    arrived: list[tuple[bytes, Any, np.ndarray]] = []

    def place(answer: list) -> list[memoryview]:
        for key, meta in answer:
            first = targets[key][0]
            fits = meta.size == first.nbytes and meta.codec in ("", "none")
            arrived.append((key, meta, first if fits else np.empty(meta.size, np.uint8)))
        return [dest.data for _, _, dest in arrived]

    def landed(i: int) -> None:
        key, meta, dest = arrived[i]
        whole = dest is targets[key][0]
        if whole and meta.checksum and xxhash.xxh3_64_intdigest(dest.data) != meta.checksum:
            log.warning("kvstore: block %s failed its checksum: a miss", key.hex())
            whole = False
        if whole:
            for other in targets[key][1:]:
                np.copyto(other, dest)
            good.add(key)

    good: set[bytes] = set()
    client.get_into(blocks, place, landed)
    return good


def host_bytes(memory_obj: Any) -> np.ndarray:
    """An LMCache memory object's bytes (its logical size, in host memory), as numpy over
    the same memory."""
    return np.frombuffer(memory_obj.byte_array, np.uint8)


def bitmap(size: int, indexes: Iterable[int]) -> Bitmap:
    found = Bitmap(size)
    found.batched_set(list(indexes))
    return found
