"""What identifies a model's computation, for the keys' salt: every engine adapter salts its
block keys with `model_identity(...)`, so KV computed with other weights, another revision,
other rope settings or config overrides, or another LoRA adapter is never found.

- `weights_fingerprint(path)`: a fingerprint of a checkpoint (a directory or one file) that
  reads headers and a few bytes, never the tensors, so it costs milliseconds on a checkpoint
  of any size. For each `*.safetensors` file: its size, its header (the JSON at the start of
  the file: 8-byte little-endian length, then JSON) reduced to tensor names, dtypes, shapes
  and `__metadata__`, the whole of every small KV-cache scale tensor (`k_scale`, `v_scale`,
  `kv_scale`: fp8 caches' scales), and 64 bytes from the middle of up to `PROBES` tensors
  spread over the sorted names, so that a fine-tune with the same shapes is told apart too.
  Other weight files (GGUF, `.bin`, `.pt`): the file's size, a hash of its first MiB and the
  same number of 64-byte probes spread over the rest. A directory adds its config files
  (`config.json`, `adapter_config.json`, quantization configs) byte for byte. The names and
  contents decide it, not where the files are: copies of the same checkpoint on other hosts
  or paths agree.
- `lora_fingerprint(path)`: the same over a LoRA adapter's directory (its
  `adapter_config.json` and weights).
- `model_identity(...)`: the fingerprint (or an explicit `weights_id` that replaces it, or
  a hub revision when no files are at hand), the config's rope settings, the engine's config
  overrides and whatever else the adapter names, as one hex digest.

Results are cached per file (path, device, inode, size, mtime), so a scheduler and its
workers or a LoRA named by every request do not hash again; a file rewritten in place gets
a new mtime and is hashed again. Deterministic across processes and hosts (blake2b over
canonical JSON, never Python's `hash()`). Plain Python: no torch, no engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("kvstore.weights")

PROBES = 32  # 64-byte reads per file, spread over its tensors (or its bytes)
PROBE_BYTES = 64
HEAD_BYTES = 1 << 20  # of a file that is not safetensors
MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header
SCALE_NAMES = frozenset({"k_scale", "v_scale", "kv_scale"})  # read whole (up to 4 KiB)
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".ckpt")  # when there is no safetensors
CONFIG_FILES = (
    "config.json",
    "params.json",
    "adapter_config.json",
    "hf_quant_config.json",
    "quant_config.json",
    "quantize_config.json",
)
ROPE_FIELDS = (
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "rope_type",
    "partial_rotary_factor",
    "rotary_pct",
    "rotary_emb_base",
)

_cache: dict[tuple[object, ...], str] = {}
_lock = threading.Lock()
_CACHE_LIMIT = 8192


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """A hex digest of the checkpoint at `path`: a directory (its top-level `*.safetensors`
    files, or else its `.bin`/`.pt`/`.pth`/`.gguf`/`.ckpt` files, and its config files) or a
    single weights file (GGUF or other: size, first MiB and probes; see the module's doc).

    FileNotFoundError when `path` does not exist; ValueError when a directory holds no
    weights or a safetensors header is malformed."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _file_digest(path)  # FileNotFoundError if it is not there
    names = sorted(n for n in _files(path) if n.endswith(".safetensors"))
    names = names or sorted(n for n in _files(path) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise ValueError(f"{path}: no weights (*.safetensors, {', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.blake2b(b"kvstore-weights-dir-v1", digest_size=16)
    for name in [*names, *(n for n in CONFIG_FILES if os.path.isfile(os.path.join(path, n)))]:
        digest.update(_field(name.encode()))
        digest.update(_field(_file_digest(os.path.join(path, name)).encode()))
    return digest.hexdigest()


def lora_fingerprint(path: str | os.PathLike[str]) -> str:
    """A hex digest of a LoRA adapter's directory (`adapter_config.json` byte for byte, its
    weights' headers, sizes and probes): two adapters under one name but with other contents
    differ. ValueError when `path` holds no `adapter_config.json`."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"{path}: not a LoRA adapter (no adapter_config.json)")
    return weights_fingerprint(path)


def local_checkpoint(name: str | os.PathLike[str], revision: str | None = None) -> str | None:
    """Where the checkpoint `name` lies on this host: `name` itself when it exists, else the
    Hugging Face hub cache's snapshot of it (when `huggingface_hub` is installed; looked up
    with `local_files_only`, never over the network), else None."""
    name = os.path.expanduser(os.fspath(name))
    if os.path.exists(name):
        return name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return snapshot_download(repo_id=name, revision=revision, local_files_only=True)
    except Exception:  # not a repo id, not cached, offline: nothing local
        return None


def rope_settings(config: object) -> dict[str, Any]:
    """The rope settings of a Hugging Face config (or a mapping), and of its text config for
    a multimodal model: what positions do to the KV, which the weights do not say."""
    found: dict[str, Any] = {}
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # a config that cannot say: its own fields still count
            text = None
        if text is not None and text is not config:
            configs.append(text)
    for i, cfg in enumerate(configs):
        for name in ROPE_FIELDS:
            try:
                value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
            except Exception:  # transformers' properties may raise for an absent field
                value = None
            if value is not None:
                found[f"text.{name}" if i else name] = value
    return found


def model_identity(
    *,
    weights_id: str | None = None,
    path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    config: object = None,
    overrides: object = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """One hex digest naming the computation whose KV the keys stand for.

    The weights: `weights_id` when given (it replaces the fingerprint: how a deployment
    names its weights itself or rotates its keys), else `weights_fingerprint(path)` when
    `path` exists, else `revision` (a hub commit), else nothing is known of them and a
    warning says so. Then `rope_settings(config)`, the engine's config `overrides` (a dict,
    or a callable named by its module and qualified name) and `extra` (what else the engine
    adapter knows changes the KV: quantization, cache dtype)."""
    parts: dict[str, object] = {}
    fingerprint = None
    if not weights_id and path is not None and os.path.exists(path):
        try:
            fingerprint = weights_fingerprint(path)
        except ValueError as exc:  # no weights we can read there: fall back, and say so
            log.warning("kvstore: no fingerprint of the weights: %s", exc)
    if weights_id:
        parts["weights_id"] = str(weights_id)
    elif fingerprint is not None:
        parts["fingerprint"] = fingerprint
    elif revision:
        parts["revision"] = str(revision)
    else:
        log.warning(
            "kvstore: the weights of %s cannot be identified (no local files, no revision): "
            "set weights_id to name them; until then other weights at the same name share keys",
            path,
        )
        parts["unidentified"] = True
    if rope := rope_settings(config):
        parts["rope"] = rope
    if overrides:
        parts["overrides"] = overrides
    if extra:
        parts["extra"] = {k: v for k, v in extra.items() if v is not None}
    return hashlib.blake2b(canonical(parts).encode(), digest_size=16).hexdigest()


def canonical(value: object) -> str:
    """`value` as deterministic JSON: sorted keys, objects by their dict or name, never an
    address (`<... at 0x...>` is cut out)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value, key=canonical)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        try:
            return to_dict()
        except Exception:
            pass
    if callable(value):
        module = getattr(value, "__module__", "") or ""
        return f"{module}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(value))


# -- files --------------------------------------------------------------------------------


def _files(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        return [e.name for e in entries if e.is_file()]


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _file_digest(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if (found := _cache.get(key)) is not None:
            return found
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            found = _safetensors_digest(f, st.st_size, path)
        elif os.path.basename(path) in CONFIG_FILES:
            found = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        else:
            found = _blob_digest(f, st.st_size)
    with _lock:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[key] = found
    return found


def _safetensors_digest(f: Any, size: int, path: str) -> str:
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path}: not safetensors (shorter than its header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > min(MAX_HEADER, size - 8):
        raise ValueError(f"{path}: not safetensors (header of {length} bytes)")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not safetensors ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not safetensors (header is not an object)")
    start = 8 + length
    metadata = header.pop("__metadata__", None)
    tensors: dict[str, tuple[object, object, int, int]] = {}
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            tensors[name] = (info["dtype"], info["shape"], begin, end)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: not safetensors (tensor {name!r})") from None
    digest = hashlib.blake2b(b"kvstore-safetensors-v1", digest_size=16)
    digest.update(_field(str(size).encode()))
    described = {n: [t[0], t[1]] for n, t in tensors.items()}
    digest.update(_field(canonical({"metadata": metadata, "tensors": described}).encode()))
    names = sorted(tensors)
    step = max(1, len(names) // PROBES)
    probed = set(names[::step][:PROBES])
    probed |= {n for n in names if n.rsplit(".", 1)[-1] in SCALE_NAMES}
    for name in sorted(probed):
        _, _, begin, end = tensors[name]
        if end <= begin:
            continue
        scale = name.rsplit(".", 1)[-1] in SCALE_NAMES and end - begin <= 4096
        at = begin if scale else begin + max(0, (end - begin) // 2 - PROBE_BYTES // 2)
        count = end - begin if scale else min(PROBE_BYTES, end - begin)
        f.seek(start + at)
        digest.update(_field(name.encode()))
        digest.update(_field(f.read(count)))
    return digest.hexdigest()


def _blob_digest(f: Any, size: int) -> str:
    """A file that is not safetensors (GGUF, pickles): its size, a hash of its first MiB
    and 64-byte probes spread over the rest; a fingerprint, not a hash of every byte."""
    digest = hashlib.blake2b(b"kvstore-file-v1", digest_size=16)
    digest.update(_field(str(size).encode()))
    digest.update(_field(f.read(HEAD_BYTES)))
    if size > HEAD_BYTES:
        span = size - HEAD_BYTES
        for i in range(PROBES):
            f.seek(HEAD_BYTES + span * i // PROBES)
            digest.update(_field(f.read(PROBE_BYTES)))
    return digest.hexdigest()
