"""Adapters that serving engines load to store and load KV through kvstore: one module or
package per engine (`vllm`, `sglang`, `lmcache`), each built only on the public client API,
and what they share (settings, the node guard, tensor views, GPU staging) in `common`."""
