"""Adapters that serving engines load to store and load KV through kvstore: one subpackage per
engine (`kvstore.integrations.vllm`), each built only on the public client API."""
