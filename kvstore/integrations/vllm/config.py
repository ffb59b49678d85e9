"""The connector's settings, read once from vLLM's `kv_connector_extra_config`, and the key
namespace both sides of the connector derive from vLLM's own configuration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kvstore import codecs, weights
from kvstore.client.client import TRANSPORTS
from kvstore.errors import Unsupported
from kvstore.integrations.common import NodeGuard, check_settings
from kvstore.integrations.vllm.layouts import CacheLayout
from kvstore.keys import block_keys, namespace_salt

LOAD_MODES = ("layer", "all", "async")


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """`kv_connector_extra_config` keys (all optional).

    - `address`: the kvstore node on this host (HOST:PORT of its gRPC port).
    - `transport`: `auto` (shared memory when the node shares the host, else its TCP data
      plane, else gRPC), or `shm`, `tcp`, `grpc` to force one.
    - `codec`: what saves encode with (`kvstore.codecs`; lossless for float32: `shuffle-lz4`,
      `shuffle-zstd`). Loads decode whatever each block names.
    - `load`: `layer` (attention on layer l waits only for layer l), `all` (the step waits for
      every layer before the forward), `async` (the request waits outside the batch while
      its KV arrives; other requests keep running).
    - `timeout_s`: the longest a load may take, and each call to the node, before the blocks
      are recomputed instead. `lookup_timeout_s`: the same for the scheduler's lookups.
    - `retry_after_s`: after a failure, the node is left alone this long (misses, no saves).
    - `model_id`: the model's name in the keys (default: vLLM's `model`, a path or HF id).
    - `ahead`: layers in flight at once on a TCP or gRPC load.
    - `cluster`: the node runs in a cluster (`--cluster`): a prompt this node lacks is
      looked for on every node (Locate), and loaded through this node, which fetches it
      from the holder (the worker talks only to the node on its host).
    - `weights_id`: names the weights in the keys instead of their computed fingerprint
      (`kvstore.weights`): set it to share KV between replicas whose checkpoints differ only
      in ways the fingerprint sees but the KV does not, or change it to rotate the keys.
    """

    address: str = "127.0.0.1:7600"
    transport: str = "auto"
    codec: str = "none"
    load: str = "layer"
    timeout_s: float = 5.0
    lookup_timeout_s: float = 1.0
    retry_after_s: float = 10.0
    model_id: str = ""
    ahead: int = 2
    checksum: bool = True
    weights_id: str = ""
    cluster: bool = False

    def __post_init__(self) -> None:
        check_settings(
            self.transport,
            TRANSPORTS,
            timeout_s=self.timeout_s,
            lookup_timeout_s=self.lookup_timeout_s,
            retry_after_s=self.retry_after_s,
        )
        if self.load not in LOAD_MODES:
            raise ValueError(f"load: must be one of {', '.join(LOAD_MODES)}")
        if self.codec not in codecs.NAMES:
            raise ValueError(f"codec: unknown {self.codec!r} (see kvstore.codecs)")
        if self.ahead < 1:
            raise ValueError("ahead: must be >= 1")

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """From `kv_connector_extra_config`; an unknown key is an error, not ignored."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown {', '.join(unknown)}")
        return cls(**extra)

    def node_guard(self, side: str, timeout_s: float) -> NodeGuard:
        """The node as one side of the connector calls it, each call within `timeout_s`."""
        options = {"timeout": timeout_s, "checksum": self.checksum, "codec": self.codec}
        return NodeGuard(
            self.address, side, self.retry_after_s, transport=self.transport, **options
        )


@dataclass(frozen=True, slots=True)
class Namespace:
    """What the KV of one vLLM deployment is, for the keys: blocks are shared only between
    engines that agree on every field, and only within one `cache_salt` and LoRA adapter
    (named by `lora_identity`: its contents, not its name)."""

    model: str
    dtype: str
    layout: str  # how a page's bytes are laid out (backend, ISA, layout of the cache)
    block_size: int
    tp_size: int
    layers: tuple[int, ...]  # every attention layer's index, all pipeline stages
    weights: str  # `weights_identity`: the weights, rope settings, overrides, quantization

    def salt(self, tp_rank: int, cache_salt: str | None, lora: str | None) -> bytes:
        parts: dict[str, object] = {
            "engine": "vllm",
            "model": self.model,
            "weights": self.weights,
            "dtype": self.dtype,
            "layout": self.layout,
            "block_size": self.block_size,
            "tp_rank": tp_rank,
            "tp_size": self.tp_size,
        }
        if cache_salt is not None:
            parts["cache_salt"] = cache_salt
        if lora is not None:
            parts["lora"] = lora
        return namespace_salt(**parts)

    def block_keys(
        self, token_ids: Sequence[int], tp_rank: int, cache_salt: str | None, lora: str | None
    ) -> list[bytes]:
        """kvstore's chained keys of the prompt's full blocks, as rank `tp_rank` stores them
        (each layer's page under `kvstore.client.layers.layer_key(key, layer)`)."""
        return block_keys(token_ids, self.block_size, self.salt(tp_rank, cache_salt, lora))


def namespace(vllm_config: Any, kv_cache_config: Any, config: ConnectorConfig) -> Namespace:
    """The namespace from vLLM's configuration, the same in the scheduler and every worker."""
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.platforms import current_platform

    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    layout = f"{current_platform.device_type}:{kv_cache_config.kv_cache_layout}"
    if current_platform.device_type == "cpu":
        layout += f":{_cpu_isa(spec, vllm_config.cache_config.cache_dtype)}"
    layout += f":heads={spec.num_kv_heads}:head_size={spec.head_size}"
    names = [name for g in kv_cache_config.kv_cache_groups for name in g.layer_names]
    return Namespace(
        model=config.model_id or str(vllm_config.model_config.model),
        dtype=str(spec.dtype).removeprefix("torch."),
        layout=layout,
        block_size=spec.block_size,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        layers=tuple(sorted({extract_layer_index(name) for name in names})),
        weights=weights_identity(vllm_config.model_config, vllm_config.cache_config, config),
    )


def cache_layout(vllm_config: Any, block_size: int) -> CacheLayout:
    """How vLLM lays out its GPU cache (`layouts.CacheLayout`): its attention backend, the
    resolved KV cache layout and the cache dtype; one backend for every layer, or none."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

    names = sorted({backend.get_name() for backend in get_current_attn_backends(vllm_config)})
    if len(names) != 1:
        raise Unsupported(f"kvstore's vLLM connector: attention backends {names}, not one")
    cache = vllm_config.cache_config
    layout = cache.get_resolved_kv_cache_layout().name
    return CacheLayout(names[0], layout, block_size, str(cache.cache_dtype))


def weights_identity(model_config: Any, cache_config: Any, config: ConnectorConfig) -> str:
    """What identifies the computation, from vLLM's `ModelConfig` and `CacheConfig`
    (`kvstore.weights.model_identity`): the checkpoint's fingerprint (its files where vLLM
    loads them, or the hub cache's snapshot), else the resolved hub revision; `weights_id`
    replaces both. Then the HF config's rope settings, `hf_overrides`, the quantization and
    the model's dtype, and for an fp8 cache its dtype and skipped layers.

    fp8 caches' k/v scales are module attributes set in the workers when the weights load,
    out of the scheduler's reach (it makes the keys); they come from the checkpoint, whose
    `k_scale`/`v_scale` tensors the fingerprint reads whole, or are 1.0."""
    revision = model_config.revision
    revision = getattr(revision, "resolved", None) or revision
    local = None if config.weights_id else weights.local_checkpoint(model_config.model, revision)
    hf_config = getattr(model_config, "hf_config", None)
    extra: dict[str, object] = {
        "quantization": model_config.quantization,
        "quantization_config": getattr(hf_config, "quantization_config", None),
        "model_dtype": str(model_config.dtype).removeprefix("torch."),
    }
    cache_dtype = str(getattr(cache_config, "cache_dtype", "auto"))
    if cache_dtype.startswith("fp8"):
        extra["cache_dtype"] = cache_dtype
        extra["kv_cache_dtype_skip_layers"] = list(cache_config.kv_cache_dtype_skip_layers)
    return weights.model_identity(
        weights_id=config.weights_id or None,
        path=local or model_config.model,
        revision=revision,
        config=hf_config,
        overrides=model_config.hf_overrides,
        extra=extra,
    )


def lora_identity(lora_request: Any) -> str | None:
    """What names a request's LoRA adapter in the keys: the fingerprint of its files
    (`kvstore.weights.lora_fingerprint`, over the directory vLLM loads it from or its hub
    cache snapshot), never just its name. None for a request without one. LookupError when
    its files are not on this host (yet): such a request is left alone."""
    if lora_request is None:
        return None
    path = weights.local_checkpoint(lora_request.lora_path)
    if path is None:
        raise LookupError(f"LoRA {lora_request.lora_name!r}: no files at {lora_request.lora_path}")
    try:
        return weights.lora_fingerprint(path)
    except (OSError, ValueError) as exc:
        raise LookupError(f"LoRA {lora_request.lora_name!r}: {exc}") from None


def _cpu_isa(spec: Any, cache_dtype: str) -> str:
    """The CPU attention kernel's packing of a page (K is stored transposed by `vec`), which
    decides its bytes as much as the layout does."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, cache_dtype)
    except (ImportError, AttributeError, TypeError):  # another vLLM: name it, do not guess
        return "isa-unknown"
