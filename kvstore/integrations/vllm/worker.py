"""The connector in each vLLM worker process: loads and saves of pages, per layer.

`start_load_kv` starts every planned load; `wait_for_layer_load(layer)` waits for that layer
only. `save_kv_layer` hands each layer's new pages to the saver thread as the forward pass
produces them; `wait_for_save` hands over what the pass did not, and returns. A step's loads
are over (and their failures known) before the step reports; async loads and saves are
reported through `get_finished` when they are.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvstore.client.layers import LayeredKV
from kvstore.integrations.common import unpin_thread
from kvstore.integrations.vllm.config import ConnectorConfig, Namespace, cache_layout
from kvstore.integrations.vllm.gpu_pages import GpuPages
from kvstore.integrations.vllm.loads import Load, Staging
from kvstore.integrations.vllm.pages import PageCache, Pages
from kvstore.integrations.vllm.plans import KVStoreMetadata, KVStoreStats, LoadPlan
from kvstore.integrations.vllm.saves import SaveJob, Saver

SHUTDOWN_S = 30.0  # how long a closing worker waits for its saves to land


class WorkerSide:
    def __init__(
        self, config: ConnectorConfig, namespace: Namespace, rank: int, vllm_config: Any = None
    ) -> None:
        self.config = config
        self.namespace = namespace
        self.rank = rank
        self._vllm_config = vllm_config  # where a GPU cache's layout is read from
        self._guard = config.node_guard("worker", config.timeout_s)
        self._io = ThreadPoolExecutor(
            max(2, config.ahead), thread_name_prefix="kvstore-io", initializer=unpin_thread
        )
        self._staging = Staging()
        self._pages: PageCache | None = None
        self._layered: LayeredKV | None = None
        self._saver: Saver | None = None
        self._shared: Future[bool] | None = None
        self._probe_after = 0.0
        self._step_loads: list[Load] = []
        self._async_loads: dict[str, Load] = {}
        self._errors: set[int] = set()
        self._jobs: list[SaveJob] = []  # this step's saves
        self._saving: set[str] = set()  # requests whose pages vLLM holds for a save
        self._finishing: set[str] = set()  # ... of which vLLM says they finished
        self._recved: set[str] = set()
        self.counts: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()

    # -- set-up -------------------------------------------------------------------

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        if any(tensor.is_cuda for tensor in kv_caches.values()):
            layout = cache_layout(self._vllm_config, self.namespace.block_size)
            self._pages = GpuPages(kv_caches, extract_layer_index, layout)
            self._staging = Staging(pinned=True)  # received pages go to the GPU by DMA
        else:
            self._pages = Pages(kv_caches, extract_layer_index)
        self._layered = LayeredKV(self._guard.client, self._pages.layers)  # connects on first use
        self._shared = self._io.submit(self._probe_shared)
        self._saver = Saver(
            self._guard,
            self._layered,
            self._pages,
            block_size=self.namespace.block_size,
            in_place=self._in_place,
        )

    def _probe_shared(self) -> bool:
        """Whether the node shares this host (shared memory: leases and in-place puts)."""
        if self.config.transport not in ("auto", "shm"):
            return False
        try:
            client = self._guard.client
            client.node_info()  # raises while the node is away: `shared_arena` only says None
            assert self._pages is not None
            return self._pages.attach(client)  # a GPU cache page-locks the arena, once
        except Exception:  # the node is away: try again later, TCP until then
            self._probe_after = time.monotonic() + self.config.retry_after_s
            return False

    def _is_shared(self, wait: float) -> bool:
        shared = self._shared
        if shared is None:
            return False
        try:
            value = shared.result(timeout=wait)
        except Exception:  # still probing: not known to share the host yet
            return False
        if not value and self._probe_after and time.monotonic() >= self._probe_after:
            self._probe_after = 0.0
            self._shared = self._io.submit(self._probe_shared)
        return value

    def _in_place(self) -> bool:
        return self.config.codec in ("", "none") and self._is_shared(self.config.timeout_s)

    # -- per step -----------------------------------------------------------------

    def bind(self, meta: KVStoreMetadata) -> None:
        """Register the step's saves (so their pages stay held until they are done)."""
        assert self._saver is not None
        self._jobs = [self._saver.add(plan, plan.keys[self.rank]) for plan in meta.saves]
        self._saving.update(plan.req_id for plan in meta.saves)

    def preempted(self, meta: KVStoreMetadata) -> None:
        """Before a step that may reuse a preempted request's pages: its saves must be done."""
        saving = meta.preempted & self._saving
        if saving and self._saver and not self._saver.wait(saving, self.config.timeout_s):
            self.counts["preempted_save_timeouts"] += 1

    def start_loads(self, meta: KVStoreMetadata) -> None:
        if meta.loads:
            assert self._pages is not None
            self._pages.loading()  # after what the compute stream did to their blocks
        for plan in meta.loads:
            load = self._load(plan)
            if plan.is_async:
                self._async_loads[plan.req_id] = load
            else:
                self._step_loads.append(load)
        if self.config.load == "all":
            for load in self._step_loads:
                load.wait_all()

    def wait_layer(self, name: str) -> None:
        if not self._step_loads:
            return
        assert self._pages is not None
        layer = self._pages.by_name[name]
        for load in self._step_loads:
            load.wait(layer)

    def save_layer(self, name: str) -> None:
        if self._jobs:
            assert self._saver is not None and self._pages is not None
            layer = self._pages.by_name[name]
            self._pages.computed(layer)  # its pages are final at this point of the stream
            self._saver.layer(layer, self._jobs)

    def end_step(self) -> None:
        """After the forward pass: the step's loads end (their failures are reported with
        this step) and every layer of its saves is queued."""
        for load in self._step_loads:
            self._ended(load)
        self._step_loads = []
        if self._jobs:
            assert self._saver is not None
            assert self._pages is not None
            for layer in self._pages.layers:  # those vLLM did not hand over: final now
                if any(layer not in job.submitted for job in self._jobs):
                    self._pages.computed(layer)
            self._saver.rest(self._jobs)
            self._jobs = []

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose saves are done (of those vLLM said finished), and async loads that
        ended this step, failed or not."""
        assert self._saver is not None
        self._finishing |= finished_req_ids & self._saving
        sending = {r for r in self._finishing if not self._saver.pending(r)}
        self._finishing -= sending
        self._saving -= sending
        recving = set()
        for req_id, load in list(self._async_loads.items()):
            if load.done():
                self._ended(self._async_loads.pop(req_id))
                recving.add(req_id)
        return sending or None, recving or None

    def load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def stats(self) -> KVStoreStats | None:
        """The counters since the last call (vLLM asks every step, and logs them)."""
        counts, self.counts = self.counts, Counter()  # swapped, not cleared: other threads count
        counts += self._guard.take_counts()
        if self._saver is not None:
            counts += self._saver.take_counts()
        self._totals += counts
        if not counts:
            return None
        stats = KVStoreStats()
        stats.add(counts)
        return stats

    def totals(self) -> dict[str, int]:
        self.stats()
        return dict(self._totals)

    def events(self) -> list:
        return [] if self._saver is None else self._saver.take_events()

    def flush(self, timeout: float) -> bool:
        """Until every save queued so far is done (tests and benchmarks use it)."""
        return self._saver is None or self._saver.wait(None, timeout)

    def close(self) -> None:
        if self._saver is not None:
            self._saver.close(SHUTDOWN_S)
        for load in [*self._step_loads, *self._async_loads.values()]:
            load.end()
        self._io.shutdown(wait=False)
        self._guard.close()

    # -- helpers ------------------------------------------------------------------

    def _load(self, plan: LoadPlan) -> Load:
        assert self._pages is not None and self._layered is not None
        self.counts["loads"] += 1
        # a lease waits for its first key only: blocks still being saved come by gets
        lease = not plan.wait_s and self._is_shared(self.config.timeout_s)
        return Load(
            plan,
            plan.keys[self.rank],
            self._layered,
            self._pages,
            lease=lease,
            ahead=self.config.ahead,
            timeout_s=self.config.timeout_s,
            staging=self._staging,
            on_error=self._unkept if plan.wait_s else self._load_failed,
            # a load that waits for its producer holds its threads: its own, not the pool's
            executor=None if plan.wait_s else self._io,
        )

    def _load_failed(self, exc: BaseException) -> None:
        self._guard.failed("load", exc)

    def _unkept(self, exc: BaseException) -> None:
        """A load waiting for blocks its producer promised ended without them: a promise
        not kept (or late), not the node's failure: it is not left alone for it."""
        self.counts["promised_blocks_not_kept"] += 1

    def _ended(self, load: Load) -> None:
        failed = load.end()
        self._errors.update(failed)
        self.counts["loaded_blocks"] += load.loaded_blocks
        self.counts["load_failed_blocks"] += len(failed)
        self.counts["load_ms"] += round((load.arrived_at - load.started) * 1e3)
        self.counts["load_wait_ms"] += round(load.waited * 1e3)
