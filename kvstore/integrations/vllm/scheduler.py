"""The connector in vLLM's scheduler (the EngineCore process): what to load and what to save.

Per request it hashes the prompt's full blocks into kvstore's chained keys (one chain per
tensor-parallel rank), asks the node how many leading blocks it holds with every layer, and
claims them, whole blocks only and never the prompt's last token (vLLM must compute one).
Each step it plans the loads it claimed and the saves of blocks the step completes, skipping
blocks the node already holds. The only network call here is that lookup: one round trip
(~0.1 ms over the node's socket), bounded by `lookup_timeout_s`, and none while the node is
being left alone after a failure.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_events import KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore.client.layers import LayeredKV
from kvstore.errors import KVStoreError
from kvstore.integrations.vllm.config import ConnectorConfig, Namespace, lora_identity
from kvstore.integrations.vllm.plans import KVStoreEvents, KVStoreMetadata, LoadPlan, SavePlan
from kvstore.tiers.registry import TIER_REGISTRY

log = logging.getLogger("vllm.kvstore")

REMOTE = "cluster"  # a block another node holds: this node fetches it (`cluster`)
PENDING = "pending"  # a block the request's producer said it stores, not stored yet
SOURCES = {tier.name: CacheHitSource(tier.hit_source) for tier in TIER_REGISTRY}
SOURCES |= {REMOTE: CacheHitSource.P2P, PENDING: CacheHitSource.P2P}


@dataclass(eq=False)
class Tracked:
    """What the scheduler side knows of one request, from its first lookup to its end."""

    request: Any  # vLLM's Request
    chains: list[list[bytes]]  # per tensor-parallel rank, the keys of the prompt's full blocks
    local: int = 0  # tokens vLLM's own prefix cache had, at the last lookup
    tiers: list[str] = field(default_factory=list)  # of each leading block the node holds
    load_ids: list[int] = field(default_factory=list)  # vLLM blocks a load fills
    failed: int = 0  # of those, blocks the load did not bring whole
    block_ids: list[int] = field(default_factory=list)  # the request's block table so far
    saved: int = 0  # leading blocks stored or planned to be
    save_blocks: int = 0
    loading: bool = False  # an async load is in flight
    waits: bool = False  # its load waits for blocks still being saved (async, then)
    waited: bool = False  # such a load was planned: the promise is not waited for again


class SchedulerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        namespace: Namespace,
        *,
        consumer: bool,
        producer: bool,
    ) -> None:
        self.config = config
        self.namespace = namespace
        self.consumer = consumer
        self.producer = producer
        self._guard = config.node_guard("scheduler", config.lookup_timeout_s)
        self._layered: LayeredKV | None = None
        self._requests: dict[str, Tracked] = {}
        self._loads: list[LoadPlan] = []
        self._events: list[KVCacheEvent] = []
        self.counts: Counter[str] = Counter()

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond `num_computed_tokens` (vLLM's own hit) to load, and whether the
        load is asynchronous."""
        tracked = self._track(request)
        if tracked is None:
            return 0, False
        tracked.local = num_computed_tokens
        tracked.tiers = self._guard.call("lookup", lambda: self._lookup(tracked), [])
        tracked.tiers += [PENDING] * _promised(tracked)
        tracked.saved = max(tracked.saved, len(tracked.tiers))
        self.counts["lookups"] += 1
        if not self.consumer:
            return 0, False
        size = self.namespace.block_size
        claimable = (request.num_tokens - 1) // size  # vLLM computes the last token itself
        first, end = num_computed_tokens // size, min(len(tracked.tiers), claimable)
        tokens = max(0, end * size - num_computed_tokens)
        claimed = tracked.tiers[first:end] if tokens else []
        tracked.waits = PENDING in claimed
        self.counts["claimed_tokens"] += tokens
        self.counts["claimed_remote_blocks"] += claimed.count(REMOTE)
        self.counts["claimed_pending_blocks"] += claimed.count(PENDING)
        return tokens, tokens > 0 and (self.config.load == "async" or tracked.waits)

    def after_alloc(self, request: Any, blocks: Any, external_tokens: int) -> None:
        tracked = self._requests.get(request.request_id)
        if tracked is None or external_tokens <= 0:
            return
        size = self.namespace.block_size
        first, end = tracked.local // size, (tracked.local + external_tokens) // size
        tracked.load_ids = list(blocks.get_block_ids()[0][first:end])
        tracked.failed = 0
        is_async = self.config.load == "async" or tracked.waits
        tracked.waited |= tracked.waits
        tracked.loading = is_async
        keys = [chain[first:end] for chain in tracked.chains]
        claimed = tracked.tiers[first:end]
        plan = LoadPlan(
            request.request_id,
            keys,
            tracked.load_ids,
            is_async,
            wait_s=self.config.timeout_s if tracked.waits else 0.0,
            fetch=self.config.cluster and (REMOTE in claimed or PENDING in claimed),
        )
        self._loads.append(plan)

    def hit_sources(self, request: Any, external_tokens: int) -> dict[CacheHitSource, int]:
        tracked = self._requests.get(request.request_id)
        if tracked is None or not external_tokens:
            return {}
        size = self.namespace.block_size
        first = tracked.local // size
        sources: dict[CacheHitSource, int] = {}
        for tier in tracked.tiers[first : first + external_tokens // size]:
            source = SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            sources[source] = sources.get(source, 0) + size
        return sources

    def build_meta(self, output: Any) -> KVStoreMetadata:
        meta = KVStoreMetadata(loads=self._loads, preempted=set(output.preempted_req_ids or ()))
        self._loads = []
        steps: list[tuple[Tracked, int]] = []  # (request, tokens computed before this step)
        for new in output.scheduled_new_reqs:
            if (tracked := self._requests.get(new.req_id)) is not None:
                tracked.block_ids = list(new.block_ids[0])
                steps.append((tracked, new.num_computed_tokens))
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if (tracked := self._requests.get(req_id)) is None:
                continue
            added = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(added[0]) if added else []
            elif added:
                tracked.block_ids.extend(added[0])
            steps.append((tracked, cached.num_computed_tokens[i]))
        if self.producer:
            for tracked, done in steps:
                scheduled = output.num_scheduled_tokens.get(tracked.request.request_id, 0)
                if (plan := self._save_plan(tracked, done, done + scheduled)) is not None:
                    meta.saves.append(plan)
        return meta

    def connector_output(self, output: Any) -> None:
        events = output.kv_cache_events
        if isinstance(events, KVStoreEvents):
            self._events += events.aggregate().get_all_events()
        for req_id in output.finished_recving or ():
            if (tracked := self._requests.get(req_id)) is not None:
                tracked.loading = False
        if output.invalid_block_ids:
            for tracked in self._requests.values():
                bad = [i for i, b in enumerate(tracked.load_ids) if b in output.invalid_block_ids]
                if bad:
                    tracked.failed = len(tracked.load_ids) - bad[0]

    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """Whether vLLM must keep the request's pages until the worker reports it (a save
        reads them, or an async load still writes them), and what the request did here."""
        tracked = self._requests.pop(request.request_id, None)
        if tracked is None:
            return False, None
        report = {
            "hit_blocks": len(tracked.tiers),
            "loaded_blocks": len(tracked.load_ids) - tracked.failed,
            "failed_blocks": tracked.failed,
            "saved_blocks": tracked.save_blocks,
            **_promise(tracked),
        }
        return bool(tracked.save_blocks) or tracked.loading, {"kvstore": report}

    def take_events(self) -> Iterable[KVCacheEvent]:
        events, self._events = self._events, []
        return events

    def stats(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts + self._guard.take_counts()

    def close(self) -> None:
        self._guard.close()

    # -- helpers ------------------------------------------------------------------

    def _track(self, request: Any) -> Tracked | None:
        """The request's keys, made once; None for what the keys cannot stand for (prompt
        embeddings, images: their KV is not a function of the token ids alone; a LoRA
        adapter whose files are not on this host)."""
        if (tracked := self._requests.get(request.request_id)) is not None:
            return tracked
        tokens = request.prompt_token_ids
        if not tokens or getattr(request, "mm_features", None):
            return None
        try:
            lora = lora_identity(request.lora_request)
        except LookupError as exc:  # its KV cannot be named: neither loaded nor saved
            if not self.counts["lora_unidentified"]:
                log.warning("kvstore connector: request left alone: %s", exc)
            self.counts["lora_unidentified"] += 1
            return None
        chains = [
            self.namespace.block_keys(tokens, rank, request.cache_salt, lora)
            for rank in range(self.namespace.tp_size)
        ]
        tracked = self._requests[request.request_id] = Tracked(request, chains)
        return tracked

    def _lookup(self, tracked: Tracked) -> list[str]:
        """The tier of each leading block this node holds; with `cluster`, then the blocks
        another node holds beyond them."""
        if not tracked.chains[0]:
            return []
        if self._layered is None:
            self._layered = LayeredKV(self._guard.client, self.namespace.layers)
        tiers = self._layered.lookup_tiers(*tracked.chains)
        if self.config.cluster and len(tiers) < len(tracked.chains[0]):
            try:
                held = self._layered.locate(*tracked.chains)
            except KVStoreError as exc:  # the cluster's index: this node's blocks still count
                self.counts["locate_failed"] += 1
                log.debug("kvstore connector: locate failed: %s", exc)
                held = 0
            tiers += [REMOTE] * (held - len(tiers))
        return tiers

    def _save_plan(self, tracked: Tracked, done: int, end: int) -> SavePlan | None:
        """The prompt blocks the step completes that the node does not hold yet."""
        size = self.namespace.block_size
        first = max(done // size, tracked.saved)
        end_block = min(end // size, len(tracked.chains[0]), len(tracked.block_ids))
        if first >= end_block:
            return None
        tracked.saved = end_block
        tracked.save_blocks += end_block - first
        request = tracked.request
        hashes = [maybe_convert_block_hash(h) for h in request.block_hashes[:end_block]]
        if len(hashes) < end_block:  # vLLM hashes nothing without prefix caching: ours, then
            hashes = list(tracked.chains[0][:end_block])
        return SavePlan(
            req_id=request.request_id,
            keys=[chain[first:end_block] for chain in tracked.chains],
            block_ids=tracked.block_ids[first:end_block],
            hashes=hashes[first:end_block],
            parent=hashes[first - 1] if first else None,
            token_ids=list(request.prompt_token_ids[first * size : end_block * size]),
        )


def _promise(tracked: Tracked) -> dict[str, Any]:
    """What a consumer of the same prompt needs to wait for this request's blocks (its
    `kv_transfer_params`, which a disaggregated proxy passes on): how many leading blocks
    are stored or being saved, and the last one's key, so that another prompt, namespace
    or salt never waits for them."""
    if not tracked.saved:
        return {}
    return {"stored_blocks": tracked.saved, "last_key": tracked.chains[0][tracked.saved - 1].hex()}


def _promised(tracked: Tracked) -> int:
    """Blocks beyond those found that the request's producer says it stores (`_promise`, in
    the request's `kv_transfer_params`), if its last key is this request's own; none once
    a load waited for them (what did not come then is recomputed)."""
    if tracked.waited:
        return 0
    params = (getattr(tracked.request, "kv_transfer_params", None) or {}).get("kvstore")
    if not isinstance(params, dict):
        return 0
    stored, key, chain = params.get("stored_blocks"), params.get("last_key"), tracked.chains[0]
    if not isinstance(stored, int) or not 0 < stored <= len(chain):
        return 0
    if chain[stored - 1].hex() != key:
        return 0
    return max(0, stored - len(tracked.tiers))
