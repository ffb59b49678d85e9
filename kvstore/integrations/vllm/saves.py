"""Saves run on one background thread, a layer at a time as the forward pass produces it, so
neither prefill nor decode waits for the node. vLLM holds a saving request's pages after it
finishes (`request_finished` returns delay_free) until the worker reports the save done, and
a preempted request's pages are waited for before the step that may reuse them.

A block counts as stored only once every layer of it is (`LayeredKV.lookup`), so a save that
failed halfway leaves a shorter prefix, never a block with a hole in it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vllm.distributed.kv_events import BlockStored, KVCacheEvent

from kvstore.client.layers import LayeredKV
from kvstore.integrations.common import NodeGuard, unpin_thread
from kvstore.integrations.vllm.pages import PageCache
from kvstore.integrations.vllm.plans import SavePlan
from kvstore.tiers.registry import TIER_REGISTRY

MEDIUMS = {tier.name: tier.medium for tier in TIER_REGISTRY}  # as kvstore's own KV events


@dataclass(eq=False)
class SaveJob:
    plan: SavePlan
    keys: list[bytes]  # this rank's keys of the plan's blocks
    layers_left: set[int]
    ok: bool = True
    submitted: set[int] = field(default_factory=set)


class Saver:
    """One worker's saves, in the order they were queued."""

    def __init__(
        self,
        guard: NodeGuard,
        layered: LayeredKV,
        pages: PageCache,
        *,
        block_size: int,
        in_place: Callable[[], bool],
    ) -> None:
        """`in_place()`: whether a put may write the node's shared arena directly (asked in
        the saving thread, before each put)."""
        self._guard = guard
        self._layered = layered
        self._pages = pages
        self._block_size = block_size
        self._in_place = in_place
        self._queue: queue.Queue[tuple[int, list[SaveJob]] | None] = queue.Queue()
        self._pending: Counter[str] = Counter()  # request id -> jobs not done
        self._done = threading.Condition()
        self._events: list[KVCacheEvent] = []
        self.counts: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="kvstore-saver", daemon=True)
        self._thread.start()

    def add(self, plan: SavePlan, keys: list[bytes]) -> SaveJob:
        job = SaveJob(plan, keys, set(self._pages.layers))
        with self._done:
            self._pending[plan.req_id] += 1
        return job

    def layer(self, layer: int, jobs: list[SaveJob]) -> None:
        """Queue layer `layer` of these jobs: its pages are final once the layer has run."""
        todo = [job for job in jobs if layer not in job.submitted]
        for job in todo:
            job.submitted.add(layer)
        if todo:
            self._queue.put((layer, todo))

    def rest(self, jobs: Iterable[SaveJob]) -> None:
        """Queue the layers of these jobs that the forward pass did not hand over."""
        for layer in self._pages.layers:
            self.layer(layer, list(jobs))

    def pending(self, req_id: str) -> int:
        with self._done:
            return self._pending[req_id]

    def wait(self, req_ids: Iterable[str] | None, timeout: float) -> bool:
        """Until these requests' saves (all, for None) are done; False at the timeout."""
        req_ids = None if req_ids is None else set(req_ids)
        deadline = time.monotonic() + timeout

        def settled() -> bool:
            if req_ids is None:
                return not self._pending
            return not any(self._pending[r] for r in req_ids)

        with self._done:
            return self._done.wait_for(settled, max(0.0, deadline - time.monotonic()))

    def take_counts(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts

    def take_events(self) -> list[KVCacheEvent]:
        with self._done:
            events, self._events = self._events, []
        return events

    def close(self, timeout: float) -> None:
        self.wait(None, timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        unpin_thread()
        while (item := self._queue.get()) is not None:
            layer, jobs = item
            self._put(layer, [job for job in jobs if job.ok])
            for job in jobs:
                job.layers_left.discard(layer)
                if not job.layers_left:
                    self._finish(job)

    def _put(self, layer: int, jobs: list[SaveJob]) -> None:
        """One put for the layer's pages of every job queued with it (a key once)."""
        if not jobs:
            return
        pages: dict[bytes, int] = {}  # key -> vLLM block id
        for job in jobs:
            for key, block_id in zip(job.keys, job.plan.block_ids, strict=True):
                pages.setdefault(key, block_id)
        keys, block_ids = list(pages), list(pages.values())
        if not self._guard.available():
            self.counts["save_skipped"] += len(jobs)
            for job in jobs:
                job.ok = False
            return
        try:
            if self._in_place():
                fill = self._pages.fill(layer, block_ids)
                dtype, shape = self._pages.dtype, self._pages.shape
                self._layered.put_in_place(keys, layer, dtype, shape, fill)
            else:
                self._layered.put(keys, layer, self._pages.views(layer, block_ids))
        except Exception as exc:  # the node's trouble: these blocks are not saved, vLLM goes on
            self._guard.failed("save", exc)
            for job in jobs:
                job.ok = False
            return
        self._guard.succeeded()
        self.counts["save_pages"] += len(keys)
        self.counts["save_bytes"] += len(keys) * self._pages.nbytes

    def _finish(self, job: SaveJob) -> None:
        if job.ok:
            self.counts["saved_blocks"] += len(job.keys)
            tiers: list[str] = self._guard.call(
                "save", lambda: self._layered.lookup_tiers(job.keys), []
            )
            events = stored_events(job.plan, tiers, self._block_size)
        else:
            self.counts["save_failed_blocks"] += len(job.keys)
            events = []
        with self._done:
            self._events += events
            self._pending[job.plan.req_id] -= 1
            if not self._pending[job.plan.req_id]:
                del self._pending[job.plan.req_id]
            self._done.notify_all()


def stored_events(plan: SavePlan, tiers: list[str], block_size: int) -> list[KVCacheEvent]:
    """`BlockStored` for the plan's blocks the node holds, one per run of blocks in the same
    tier, with the tier as the medium and vLLM's own block hashes, so a router reading vLLM's
    event stream sees which of its blocks kvstore holds, and where."""
    events: list[KVCacheEvent] = []
    start = 0
    while start < len(tiers):
        end = start
        while end < len(tiers) and tiers[end] == tiers[start]:
            end += 1
        parent = plan.parent if start == 0 else plan.hashes[start - 1]
        events.append(
            BlockStored(
                block_hashes=plan.hashes[start:end],
                parent_block_hash=parent,
                token_ids=plan.token_ids[start * block_size : end * block_size],
                block_size=block_size,
                lora_id=None,
                medium=MEDIUMS.get(tiers[start], tiers[start].upper()),
                lora_name=None,
            )
        )
        start = end
    return events
