"""`KVStoreConnector`: vLLM's KV connector interface (v1, vLLM 0.32) over kvstore.

vLLM builds it twice, in two processes that share nothing: with the SCHEDULER role in the
EngineCore process (lookups and plans: `scheduler.py`) and with the WORKER role in each
worker (pages in and out: `worker.py`). This class only routes vLLM's calls to the side it
is; the plans travel between them inside vLLM's own per-step metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvstore.integrations.vllm.config import ConnectorConfig, lora_identity, namespace
from kvstore.integrations.vllm.plans import KVStoreEvents, KVStoreMetadata, KVStoreStats
from kvstore.integrations.vllm.scheduler import SchedulerSide
from kvstore.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvstore")


class KVStoreConnector(KVConnectorBase_V1):
    """Load with `kv_transfer_config={"kv_connector": "KVStoreConnector",
    "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
    "kv_connector_extra_config": {"address": "127.0.0.1:7600"}}` (see `ConnectorConfig`).
    `kv_producer` only saves, `kv_consumer` only loads, `kv_both` does both."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        self.namespace = namespace(vllm_config, kv_cache_config, self.config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                # a block kvstore could not bring is a cache miss, never a failed request
                log.info("kvstore connector: kv_load_failure_policy set to recompute")
                transfer.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(
                self.config,
                self.namespace,
                consumer=transfer.is_kv_consumer,
                producer=transfer.is_kv_producer,
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(self.config, self.namespace, rank, vllm_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that did not happen is a later miss, nothing more

    # -- scheduler side -----------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        assert self._scheduler is not None
        return self._scheduler.hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request)

    def take_events(self) -> Iterable[KVCacheEvent]:
        return () if self._scheduler is None else self._scheduler.take_events()

    # -- worker side --------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, KVStoreMetadata)
        self._worker.bind(connector_metadata)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None and isinstance(kv_connector_metadata, KVStoreMetadata)
        self._worker.preempted(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreMetadata)
        self._worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        assert self._worker is not None
        self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.end_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is not None:
            return self._worker.stats()
        assert self._scheduler is not None
        counts = self._scheduler.stats()
        if not counts:
            return None
        stats = KVStoreStats()
        stats.add(counts)
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return KVStoreStats(data=dict(data or {}))

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        if self._worker is None or not (events := self._worker.events()):
            return None
        carrier = KVStoreEvents()
        carrier.add_events(events)
        return carrier

    def prompt_keys(
        self, token_ids: list[int], cache_salt: str | None = None, lora_request: Any = None
    ) -> list[bytes]:
        """kvstore's keys of a prompt's full blocks, as this worker's rank stores them; the
        page of layer l is under `kvstore.client.layers.layer_key(key, l)`. `lora_request`:
        vLLM's `LoRARequest` of the prompt, named by its files (`lora_identity`)."""
        assert self._worker is not None
        lora = lora_identity(lora_request)
        return self.namespace.block_keys(token_ids, self._worker.rank, cache_salt, lora)

    def counts(self) -> dict[str, int]:
        """This worker's counters since it started (loads, blocks, failures, fallbacks)."""
        return {} if self._worker is None else self._worker.totals()

    def flush(self, timeout: float = 60.0) -> bool:
        """Until the saves queued so far are done (workers only): what a process that is
        about to exit, a test or a benchmark may call through `LLM.collective_rpc`."""
        return self._worker is None or self._worker.flush(timeout)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()
