"""kvstore as vLLM's KV connector (vLLM 0.32): vLLM loads `KVStoreConnector` from here by
module path, `"kv_connector_module_path": "kvstore.integrations.vllm"`.

Each page of vLLM's paged KV cache (one layer of one block) is a kvstore block of its own, in
vLLM's layout, under a key derived from kvstore's chained block key: blocks are saved layer by
layer as the forward pass produces them, and loaded layer by layer, so attention on layer 0
runs while later layers arrive. See `connector.py`, then `scheduler.py` and `worker.py`.
The page movement (`layouts`, `gpu_pages`) imports torch but not vLLM, so it runs where vLLM
is not installed; the connector and its settings are imported on first use.
"""

from typing import Any

__all__ = ["ConnectorConfig", "KVStoreConnector"]


def __getattr__(name: str) -> Any:
    if name == "ConnectorConfig":
        from kvstore.integrations.vllm.config import ConnectorConfig

        return ConnectorConfig
    if name == "KVStoreConnector":
        from kvstore.integrations.vllm.connector import KVStoreConnector

        return KVStoreConnector
    raise AttributeError(name)
