"""Adapters that serving engines load to store and load KV through kvstore: one subpackage per
engine (`kvstore.integrations.vllm`), each built only on the public client API, and what they
share (the node guard, tensor views, GPU staging) in `kvstore.integrations.common`."""
