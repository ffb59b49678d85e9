"""kvstore inside vLLM: the KV connector (kvstore.integrations.vllm) tested with vLLM itself,
its CPU build, SmolLM2-135M in float32, greedy, and real daemons.

A producer process A stores a 1,000-token prompt's KV; fresh consumer processes B load it and
must report vLLM's own cached-token count for every full block (7 of 128 tokens) and produce
exactly A's tokens. Each vLLM process costs ~40 s to start, so each test is one process that
runs several checks in a row; the test drives it between them (barriers), never by time.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import Daemon, running_daemon

PROMPT = 1000  # tokens
BLOCKS = 7  # full blocks of 128 tokens: vLLM may claim them all (the last token is computed)
CACHED = BLOCKS * 128
LAYERS = 30
LONGER = PROMPT + 2 * 128  # the same text, two more full blocks
NEW = 24  # greedy tokens compared
SESSION_S = 420  # a vLLM process that takes longer is killed: no test hangs

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed: pip install -e '.[vllm]' (tests/setup.sh does)",
    ),
    # the first test to use the producer also waits for its process: two sessions' worth
    pytest.mark.timeout(2 * SESSION_S + 60),
]


@pytest.fixture(scope="module")
def model() -> str:
    from kvstore.bench.vllm_bench import model_folder

    return str(model_folder())


def spec(model: str, address: str, steps: list, **extra: object) -> dict:
    from kvstore.bench.vllm_bench import kvstore_config

    role = extra.pop("role", "kv_both")
    return {
        "model": model,
        "kv_transfer_config": kvstore_config(role, address=address, **extra),
        "prompts": {"p": PROMPT, "q": LONGER},
        "prefix_caching": False,  # every request of the process goes to the connector
        "steps": steps,
    }


def generate(name: str, salt: str | None = None, prompt: str = "p") -> dict:
    return {"op": "generate", "prompt": prompt, "name": name, "max_tokens": NEW, "salt": salt}


def session(spec: dict, log: Path):
    from kvstore.bench.vllm_bench import Session

    return Session(spec, log, timeout=SESSION_S)


@pytest.fixture(scope="module")
def producer(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Process A: it generates on the prompt and stores its KV over shared memory, with
    vLLM's KV event stream on."""
    logs = tmp_path_factory.mktemp("vllm-a")
    with running_daemon("--host-capacity", "1GiB") as daemon:
        steps = [generate("A"), {"op": "flush"}, {"op": "keys", "prompt": "p"}]
        steps.append({"op": "events", "medium": "CPU", "timeout": 120})
        steps += [generate("Q", prompt="q"), {"op": "flush", "name": "flush-q"}]
        steps.append({"op": "keys", "prompt": "q", "name": "keys-q"})
        a = spec(model, daemon.address, steps, transport="shm")
        a["prefix_caching"] = True  # vLLM's own BlockStored events need it
        a["events"] = f"ipc://{logs}/events.sock"
        with session(a, logs / "a.log") as s:
            results = s.until_done()
        keys = [bytes.fromhex(k) for k in results["keys"]["keys"]]
        longer = [bytes.fromhex(k) for k in results["keys-q"]["keys"]]
        assert longer[:BLOCKS] == keys
        yield {"daemon": daemon, "results": results, "keys": keys, "longer": longer,
               "tokens": results["A"]["tokens"]}  # fmt: skip


@contextmanager
def seeded(producer: dict) -> Iterator[Daemon]:
    """A daemon of its own holding A's pages, for a test that may spoil or kill it."""
    from kvstore.client.layers import LayeredKV

    with running_daemon("--host-capacity", "1GiB") as daemon:
        with producer["daemon"].client() as source, daemon.client(transport="tcp") as target:
            copy(LayeredKV(source, LAYERS), LayeredKV(target, LAYERS), producer["keys"])
            assert LayeredKV(target, LAYERS).lookup(producer["keys"]) == BLOCKS
        yield daemon


def test_the_producer_stores_every_full_block_and_reports_it(producer) -> None:
    from kvstore.client.layers import LayeredKV

    results, daemon = producer["results"], producer["daemon"]
    assert results["A"]["cached"] == [0]
    assert results["A"]["kvstore"] == [
        {"hit_blocks": 0, "loaded_blocks": 0, "failed_blocks": 0, "saved_blocks": BLOCKS,
         "stored_blocks": BLOCKS, "last_key": producer["keys"][-1].hex()}
    ]  # fmt: skip
    assert len(producer["tokens"]) == NEW
    assert results["flush"]["flushed"] == [True]
    with daemon.client() as client:
        assert LayeredKV(client, LAYERS).lookup(producer["keys"]) == BLOCKS
        assert client.stats().transfers.get("put/shm", 0) >= LAYERS  # in place, a layer each
    events = results["events"]["events"]
    ours = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "CPU"]
    gpu = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "GPU"]
    vllms = [h for e in gpu for h in e["hashes"]]
    assert [h for e in ours for h in e["hashes"]] == vllms[:BLOCKS]  # vLLM's own hashes
    assert ours[0]["parent"] is None and sum(e["tokens"] for e in ours) == CACHED


def test_a_consumer_over_tcp_loads_asynchronously_and_round_trips_a_codec(
    producer, model, tmp_path
) -> None:
    """B over the TCP data plane (forced), its loads asynchronous (the request waits outside
    the batch): a hit for every full block, A's tokens; its own tenant's blocks, saved with
    a lossless codec, come back decoded as the same KV."""
    with seeded(producer) as daemon:
        steps = [generate("hit"), generate("miss", "codec-tenant"), {"op": "flush"}]
        steps += [generate("again", "codec-tenant"), {"op": "counts"}]
        with daemon.client() as client:
            stored_before = client.stats().tiers[0].payload_bytes
        b = spec(model, daemon.address, steps, transport="tcp", codec="zstd", load="async")
        with session(b, tmp_path / "b.log") as s:
            results = s.until_done()
        with daemon.client() as client:
            stats = client.stats()
    a = producer["tokens"]
    assert results["hit"]["cached"] == [CACHED] and results["hit"]["tokens"] == a
    assert results["miss"]["cached"] == [0] and results["miss"]["tokens"] == a
    assert results["again"]["cached"] == [CACHED] and results["again"]["tokens"] == a
    assert stats.transfers.get("get/tcp", 0) > 0 and not stats.transfers.get("get/shm")
    raw = BLOCKS * LAYERS * 3 * 128 * 128 * 4
    assert 0 < stats.tiers[0].payload_bytes - stored_before < raw  # encoded: fewer bytes
    counts = results["counts"]["counts"][0]
    assert counts["loaded_blocks"] == 2 * BLOCKS and not counts.get("load_failed_blocks")


def test_a_consumer_over_shared_memory_uses_what_it_loads_and_survives_its_node(
    producer, model, tmp_path
) -> None:
    """B over shared memory: a full hit and A's tokens; another tenant's salt misses; a page
    of the wrong shape is a load failure vLLM recomputes; pages overwritten with other bytes
    of the right shape change the tokens (the loaded KV is really used); the node killed
    mid-run leaves B recomputing, with A's tokens."""
    from kvstore.client.layers import LayeredKV, layer_key

    keys = producer["keys"]
    with seeded(producer) as daemon:
        steps = [generate("hit"), generate("tenant", "another-tenant")]
        steps += [{"op": "barrier", "name": "spoil-a-page"}, generate("bad-page")]
        steps += [{"op": "barrier", "name": "overwrite"}, generate("overwritten")]
        steps += [{"op": "barrier", "name": "kill"}, generate("killed"), {"op": "counts"}]
        b = spec(model, daemon.address, steps, role="kv_consumer", transport="shm")
        with (
            session(b, tmp_path / "b.log") as s,
            daemon.client(transport="tcp") as client,
            producer["daemon"].client() as source,
        ):
            layered = LayeredKV(client, LAYERS)
            assert s.next()["name"] == "ready"
            hit, tenant = s.next(), s.next()
            assert s.next() == {"barrier": "spoil-a-page"}
            client.delete([layer_key(keys[3], 10)])  # block 3, layer 10: half a page
            layered.put([keys[3]], 10, [np.zeros((3, 128, 64), np.float32)])
            s.go()
            _, bad_page = s.next(), s.next()
            assert s.next() == {"barrier": "overwrite"}
            with LayeredKV(source, LAYERS).get(keys) as gets:
                pages = [gets.wait(layer, timeout=60) for layer in range(LAYERS)]
            layered.delete(keys)
            # layer l gets layer l+1's pages; reordering the blocks of a layer would change
            # nothing, as attention sums over the prefix's keys and values in any order
            for layer in range(LAYERS):
                layered.put(keys, layer, pages[(layer + 1) % LAYERS])
            s.go()
            _, overwritten = s.next(), s.next()
            assert s.next() == {"barrier": "kill"}
            transfers = client.stats().transfers
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
            s.go()
            results = s.until_done()
    a = producer["tokens"]
    assert hit["cached"] == [CACHED] and hit["tokens"] == a
    assert hit["kvstore"][0]["loaded_blocks"] == BLOCKS
    assert tenant["cached"] == [0] and tenant["tokens"] == a
    assert bad_page["tokens"] == a
    assert bad_page["kvstore"] == [
        {"hit_blocks": BLOCKS, "loaded_blocks": 3, "failed_blocks": BLOCKS - 3, "saved_blocks": 0,
         "stored_blocks": BLOCKS, "last_key": keys[-1].hex()}
    ]  # fmt: skip
    assert overwritten["cached"] == [CACHED] and overwritten["tokens"] != a
    assert transfers.get("get/shm", 0) > 0 and not transfers.get("get/tcp")
    assert not transfers.get("put/shm")  # a consumer stores nothing
    assert results["killed"]["cached"] == [0] and results["killed"]["tokens"] == a
    assert results["counts"]["counts"][0]["load_failed_blocks"] == BLOCKS - 3


def test_a_consumer_whose_node_was_killed_before_it_started_recomputes(
    producer, model, tmp_path
) -> None:
    with seeded(producer) as daemon:
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        steps = [generate("first"), generate("second"), {"op": "counts"}]
        with session(spec(model, daemon.address, steps), tmp_path / "b.log") as s:
            results = s.until_done()  # within SESSION_S, or the test fails
    for name in ("first", "second"):
        assert results[name]["cached"] == [0] and results[name]["tokens"] == producer["tokens"]
    counts = results["counts"]["counts"][0]
    assert not counts.get("loads") and not counts.get("saved_blocks")
    assert counts.get("save_failed_blocks", 0) + counts.get("save_skipped", 0) > 0


def test_a_consumer_on_another_node_waits_for_its_blocks_then_finds_them_anywhere(
    producer, model, redis_server, tmp_path
) -> None:
    """Disaggregated serving across two nodes of a cluster: consumer C on node b, the
    producer's pages landing on node a. C's request carries what A's request finished with
    (its `kv_transfer_params`, as a proxy passes them on) and reaches b before any page is
    on a: C's load waits, and b fetches every page from a as A's pages land there, layer
    by layer as A's saves put them. Then a longer prompt whose start b now holds and whose
    rest only a does: b's lookup finds the rest on a (Locate), and b fetches it."""
    from test_cluster_index import poll
    from test_fetch import node

    from kvstore.client.layers import LayeredKV

    promise = producer["results"]["A"]["kvstore"][0]
    big = ("--host-capacity", "1GiB")
    with node(redis_server.url, "a", *big) as a, node(redis_server.url, "b", *big) as b:
        steps = [{**generate("waited"), "kv_transfer_params": {"kvstore": promise}}]
        steps += [{"op": "barrier", "name": "longer"}, generate("Q", prompt="q")]
        c = spec(model, b.address, steps, role="kv_consumer", cluster=True, timeout_s=120.0)
        with (
            session(c, tmp_path / "c.log") as s,
            b.client() as reader,
            a.client() as writer,
            producer["daemon"].client() as source,
        ):
            assert s.next()["name"] == "ready"
            poll(lambda: reader.stats().lookups > 0, timeout=SESSION_S)  # C looked: none
            assert LayeredKV(reader, LAYERS).locate(producer["keys"]) == 0
            copy(LayeredKV(source, LAYERS), LayeredKV(writer, LAYERS), producer["keys"])
            waited = s.next()
            assert s.next() == {"barrier": "longer"}
            fetched_first = reader.stats().fetched_blocks
            longer = producer["longer"]
            copy(LayeredKV(source, LAYERS), LayeredKV(writer, LAYERS), longer)
            poll(lambda: LayeredKV(reader, LAYERS).locate(longer) == len(longer))
            s.go()
            results = s.until_done()
            fetched = reader.stats().fetched_blocks
    assert waited["cached"] == [CACHED] and waited["tokens"] == producer["tokens"]
    assert waited["kvstore"][0]["loaded_blocks"] == BLOCKS
    assert fetched_first == {"a": BLOCKS * LAYERS}
    assert results["Q"]["cached"] == [len(longer) * 128]
    assert results["Q"]["tokens"] == producer["results"]["Q"]["tokens"]
    assert fetched == {"a": len(longer) * LAYERS}  # the first blocks once, the rest now


def test_a_promise_counts_for_its_own_prompt_only_and_only_once() -> None:
    """What a producer's request finished with lets a consumer of the same prompt claim
    blocks not stored yet; another prompt (or namespace, or salt: other keys) claims none,
    nor does a consumer whose load already waited for them once."""
    from types import SimpleNamespace

    from kvstore.integrations.vllm.scheduler import Tracked, _promise, _promised

    chain = [bytes([i]) * 32 for i in range(5)]
    params = {"kvstore": _promise(Tracked(None, [chain], saved=4))}
    assert params["kvstore"] == {"stored_blocks": 4, "last_key": chain[3].hex()}
    asked = SimpleNamespace(kv_transfer_params=params)
    consumer = Tracked(asked, [chain], tiers=["host"])
    assert _promised(consumer) == 3  # blocks 1-3, beyond the one it found
    assert _promised(Tracked(asked, [[bytes([9]) * 32] * 5])) == 0
    assert _promised(Tracked(SimpleNamespace(kv_transfer_params={"kvstore": "x"}), [chain])) == 0
    too_many = {"kvstore": {**params["kvstore"], "stored_blocks": 9}}
    assert _promised(Tracked(SimpleNamespace(kv_transfer_params=too_many), [chain])) == 0
    consumer.waited = True
    assert _promised(consumer) == 0


def copy(source, target, keys: list[bytes]) -> None:
    """Every layer of `keys` from one node to another, a layer at a time (as saves go)."""
    with source.get(keys) as gets:
        for layer in range(LAYERS):
            target.put(keys, layer, gets.wait(layer, timeout=60))


# -- the connector's loads, without an engine ------------------------------------------


@pytest.fixture
def cache():
    """A paged cache as vLLM's CPU backend registers it: per layer [blocks, heads, tokens, C]."""
    import torch

    from kvstore.integrations.vllm.pages import Pages

    tensors = {f"model.layers.{i}.self_attn.attn": torch.zeros(10, 2, 32, 16) for i in range(4)}
    return tensors, Pages(tensors, lambda name: int(name.split(".")[2]))


def load(cache, address: str, keys: list[bytes], block_ids: list[int], **kw):
    from kvstore.client import Client
    from kvstore.client.layers import LayeredKV
    from kvstore.integrations.vllm.loads import Load, Staging
    from kvstore.integrations.vllm.plans import LoadPlan

    errors: list[BaseException] = []
    client = Client(address, timeout=kw.pop("timeout", 30))
    plan = LoadPlan("r", [keys], block_ids, False)
    options = {"lease": False, "ahead": 2, "timeout_s": 30.0, **kw}
    loaded = Load(plan, keys, LayeredKV(client, 4), cache[1], staging=Staging(),
                  on_error=errors.append, **options)  # fmt: skip
    failed = loaded.end()
    client.close()
    return failed, errors


def test_a_load_reports_the_blocks_the_node_did_not_bring(daemon, salt, rng, cache) -> None:
    from kvstore.client.layers import LayeredKV
    from kvstore.keys import block_keys

    tensors, _ = cache
    keys = block_keys(np.arange(7 * 32), 32, salt)
    kv = rng.standard_normal((4, 7, 2, 32, 16)).astype(np.float32)
    with daemon.client() as client:
        layered = LayeredKV(client, 4)
        for layer in range(4):  # 5 of the 7 blocks promised, and block 2 wrong in layer 1
            layered.put(keys[:5], layer, list(kv[layer, :5]))
        client.delete([keys_of(keys[2], 1)])
        layered.put([keys[2]], 1, [np.zeros((2, 32, 8), np.float32)])
    block_ids = [9, 3, 4, 5, 6, 7, 8]
    for lease in (False, True):
        failed, errors = load(cache, daemon.address, keys, block_ids, lease=lease)
        assert failed == [4, 5, 6, 7, 8] and not errors  # from block 2: recomputed
        assert (tensors["model.layers.3.self_attn.attn"][[9, 3]].numpy() == kv[3, :2]).all()
        assert (tensors["model.layers.0.self_attn.attn"][4].numpy() == kv[0, 2]).all()


def test_a_load_from_a_silent_node_ends_at_its_deadline(rng, cache) -> None:
    from kvstore.keys import block_keys

    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        keys = block_keys(np.arange(2 * 32), 32, b"silent")
        failed, errors = load(cache, address, keys, [1, 2], timeout_s=1.0, timeout=60)
    assert failed == [1, 2] and errors


def keys_of(block_key: bytes, layer: int) -> bytes:
    from kvstore.client.layers import layer_key

    return layer_key(block_key, layer)


def test_the_extra_config_is_checked_once() -> None:
    from kvstore.integrations.vllm import ConnectorConfig

    assert ConnectorConfig.from_extra({"address": "h:1", "load": "async"}).load == "async"
    with pytest.raises(ValueError, match="unknown adress"):
        ConnectorConfig.from_extra({"adress": "h:1"})
    with pytest.raises(ValueError, match="codec"):
        ConnectorConfig.from_extra({"codec": "gzip"})


# -- what the keys' salt identifies (vLLM's own ModelConfig over real checkpoint files) ----


def tiny_model(folder: Path, embed: tuple[int, int] = (128, 64), **config: object) -> Path:
    """A one-layer Llama checkpoint vLLM's ModelConfig reads: config.json + safetensors."""
    import json

    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    settings = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 1, "vocab_size": 128, "head_dim": 32, "dtype": "float32",
        "max_position_embeddings": 2048, "rope_parameters": {"rope_theta": 10000.0,
        "rope_type": "default"}, **config,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(settings))
    tensors = {"model.embed_tokens.weight": np.ones(embed, np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def keys_under(folder: Path, lora=None, cache_dtype: str = "auto", **extra) -> list[bytes]:
    """The connector's keys of one prompt for a vLLM deployment of `folder`, all else equal
    (the model's name too, as replicas that set `model_id` have)."""
    from vllm.config import CacheConfig, ModelConfig

    from kvstore.integrations.vllm.config import (
        ConnectorConfig,
        Namespace,
        lora_identity,
        weights_identity,
    )

    overrides = extra.pop("hf_overrides", {})
    model_config = ModelConfig(model=str(folder), dtype="float32", hf_overrides=overrides)
    config = ConnectorConfig.from_extra({"model_id": "tiny", **extra})
    identity = weights_identity(model_config, CacheConfig(cache_dtype=cache_dtype), config)
    namespace = Namespace("tiny", "float32", "cpu:test", 16, 1, (0,), identity)
    return namespace.block_keys(list(range(64)), 0, None, lora_identity(lora))


def test_the_salt_names_the_weights_not_the_model_name(tmp_path) -> None:
    import shutil

    a = tiny_model(tmp_path / "a")
    b = tiny_model(tmp_path / "b", embed=(128, 32))  # one tensor of another shape
    keys = keys_under(a)
    assert len(keys) == 4 and keys != keys_under(b)
    # the same files elsewhere, or asked again: the same keys
    assert keys_under(Path(shutil.copytree(a, tmp_path / "copy" / "a"))) == keys
    assert keys_under(a) == keys
    # an fp8 cache is another computation
    assert keys_under(a, cache_dtype="fp8") != keys


def test_rope_settings_and_hf_overrides_change_the_keys(tmp_path) -> None:
    a = tiny_model(tmp_path / "a")
    yarn = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 2048}  # fmt: skip
    scaled = tiny_model(tmp_path / "scaled", rope_parameters=yarn)
    keys = keys_under(a)
    assert keys_under(scaled) != keys
    assert keys_under(a, hf_overrides={"rope_theta": 500000.0}) != keys
    assert keys_under(a, hf_overrides={"max_position_embeddings": 4096}) != keys


def test_two_loras_under_one_name_get_different_keys(tmp_path) -> None:
    import json

    from safetensors.numpy import save_file
    from vllm.lora.request import LoRARequest

    def adapter(folder: Path, rank: int) -> str:
        folder.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        weights = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                   np.ones((rank, 64), np.float32)}  # fmt: skip
        save_file(weights, str(folder / "adapter_model.safetensors"))
        return str(folder)

    model = tiny_model(tmp_path / "model")
    one = LoRARequest("support-bot", 1, adapter(tmp_path / "v1" / "support-bot", 8))
    two = LoRARequest("support-bot", 2, adapter(tmp_path / "v2" / "support-bot", 16))
    assert keys_under(model, one) != keys_under(model, two)
    assert keys_under(model, one) == keys_under(model, LoRARequest("renamed", 3, one.lora_path))
    assert keys_under(model, one) != keys_under(model)
    with pytest.raises(LookupError):  # files not on this host: the request is left alone
        keys_under(model, LoRARequest("support-bot", 4, str(tmp_path / "absent")))


def test_an_explicit_weights_id_replaces_the_fingerprint(tmp_path) -> None:
    a = tiny_model(tmp_path / "a")
    b = tiny_model(tmp_path / "b", embed=(128, 32))
    pinned = keys_under(a, weights_id="prod-2024-06")
    assert pinned == keys_under(b, weights_id="prod-2024-06")
    assert pinned != keys_under(a)
    assert pinned != keys_under(a, weights_id="prod-2024-07")  # how keys are rotated
