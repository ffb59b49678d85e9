"""kvstore.weights: what identifies a model's computation in the keys' salt, over real
checkpoint files written here (safetensors, GGUF-like single files, LoRA directories)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.keys import block_keys, namespace_salt
from kvstore.weights import (
    lora_fingerprint,
    model_identity,
    rope_settings,
    weights_fingerprint,
)

save_file = pytest.importorskip("safetensors.numpy").save_file


def checkpoint(folder: Path, tensors: dict[str, np.ndarray], **config: object) -> Path:
    """A model directory as `save_pretrained` leaves it: config.json and model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def tensors(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def keys_of(identity: str) -> list[bytes]:
    return block_keys(np.arange(64), 16, namespace_salt(model="m", weights=identity))


def test_one_tensor_of_another_shape_changes_the_fingerprint_and_the_keys(tmp_path) -> None:
    a = checkpoint(tmp_path / "a", tensors(embed=(32, 8), q_proj=(8, 8)))
    b = checkpoint(tmp_path / "b", tensors(embed=(32, 8), q_proj=(8, 4)))
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert keys_of(model_identity(path=a)) != keys_of(model_identity(path=b))
    # the same files elsewhere: the same fingerprint (it is not the path)
    copy = Path(shutil.copytree(a, tmp_path / "elsewhere" / "a"))
    assert weights_fingerprint(copy) == weights_fingerprint(a)
    assert keys_of(model_identity(path=copy)) == keys_of(model_identity(path=a))


def test_same_shapes_with_other_values_change_the_fingerprint(tmp_path) -> None:
    """A fine-tune keeps every name and shape: the probes of tensor data tell it apart."""
    base = tensors(embed=(32, 8), q_proj=(8, 8))
    tuned = {**base, "q_proj": base["q_proj"] + 0.5}
    a = checkpoint(tmp_path / "a", base)
    b = checkpoint(tmp_path / "b", tuned)
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_fp8_kv_scales_are_read_whole(tmp_path) -> None:
    base = tensors(embed=(32, 8), **{f"l{i}.w": (8, 8) for i in range(100)})
    scale = {"l0.attn.k_scale": np.array(1.0, np.float32)}
    a = checkpoint(tmp_path / "a", {**base, **scale})
    b = checkpoint(tmp_path / "b", {**base, "l0.attn.k_scale": np.array(0.5, np.float32)})
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_a_config_change_in_the_directory_changes_the_fingerprint(tmp_path) -> None:
    weights = tensors(embed=(32, 8))
    a = checkpoint(tmp_path / "a", weights, rope_theta=10000.0)
    b = checkpoint(tmp_path / "b", weights, rope_theta=500000.0)
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_the_fingerprint_is_the_same_in_another_process(tmp_path) -> None:
    """Deterministic: a scheduler, its workers and another host agree (no `hash()`)."""
    folder = checkpoint(tmp_path / "m", tensors(embed=(32, 8), q_proj=(8, 8)))
    config = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    ours = model_identity(path=folder, config=config, overrides={"b": 1, "a": [1, 2]})
    code = (
        "import sys; from kvstore.weights import model_identity;"
        "print(model_identity(path=sys.argv[1],"
        " config={'rope_parameters': {'factor': 4.0, 'rope_type': 'yarn'}},"
        " overrides={'a': [1, 2], 'b': 1}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    theirs = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env
    )
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout.strip() == ours


def test_rope_settings_and_overrides_change_the_identity(tmp_path) -> None:
    folder = checkpoint(tmp_path / "m", tensors(embed=(32, 8)))
    plain = model_identity(path=folder, config={"rope_theta": 10000.0})
    assert plain == model_identity(path=folder, config={"rope_theta": 10000.0})
    assert plain != model_identity(path=folder, config={"rope_theta": 500000.0})
    scaled = {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert plain != model_identity(path=folder, config=scaled)
    assert plain != model_identity(
        path=folder, config={"rope_theta": 10000.0}, overrides={"max_position_embeddings": 9}
    )
    assert rope_settings({"rope_theta": 1.0, "hidden_size": 8}) == {"rope_theta": 1.0}


def test_two_loras_with_one_name_but_other_contents_differ(tmp_path) -> None:
    def lora(folder: Path, rank: int) -> Path:
        folder.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": rank, "target_modules": ["q_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors(lora_A=(rank, 8), lora_B=(8, rank)), str(folder / "adapter.safetensors"))
        return folder

    a = lora(tmp_path / "one" / "my-lora", 4)
    b = lora(tmp_path / "two" / "my-lora", 8)
    assert lora_fingerprint(a) != lora_fingerprint(b)
    assert lora_fingerprint(a) == lora_fingerprint(shutil.copytree(a, tmp_path / "copy"))
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        lora_fingerprint(checkpoint(tmp_path / "model", tensors(x=(2,))))


def test_an_explicit_weights_id_replaces_the_fingerprint(tmp_path) -> None:
    a = checkpoint(tmp_path / "a", tensors(embed=(32, 8)))
    b = checkpoint(tmp_path / "b", tensors(embed=(16, 8)))
    assert model_identity(path=a) != model_identity(path=b)
    pinned = model_identity(weights_id="prod-2024-06", path=a)
    assert pinned == model_identity(weights_id="prod-2024-06", path=b)
    assert pinned != model_identity(path=a)
    assert pinned != model_identity(weights_id="prod-2024-07", path=a)  # how keys rotate


def test_without_files_the_revision_names_the_weights(tmp_path) -> None:
    missing = tmp_path / "not-here"
    assert model_identity(path=missing, revision="a" * 40) != model_identity(
        path=missing, revision="b" * 40
    )


def test_single_files_use_size_and_first_mib(tmp_path) -> None:
    """GGUF (or any other single file): its size, its first MiB and probes of the rest."""
    head = b"GGUF" + bytes(2 << 20)
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(head)
    b.write_bytes(head[:100] + b"x" + head[101:])  # within the first MiB
    c.write_bytes(head + b"more")  # another size
    fingerprints = {weights_fingerprint(p) for p in (a, b, c)}
    assert len(fingerprints) == 3
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    shutil.copy(a, folder / "model.gguf")
    (folder / "__init__.py").write_text("")  # not weights: ignored
    other = tmp_path / "other-folder"
    shutil.copytree(folder, other)
    shutil.copy(b, other / "model.gguf")
    assert weights_fingerprint(folder) != weights_fingerprint(other)


def test_a_rewritten_file_is_hashed_again_and_an_untouched_one_is_not(tmp_path) -> None:
    """The cache is per (path, size, mtime): bytes swapped under an unchanged mtime are not
    read again (proof that nothing is re-hashed); a new mtime is."""
    folder = checkpoint(tmp_path / "m", tensors(embed=(32, 8)))
    path = folder / "model.safetensors"
    before = weights_fingerprint(folder)
    stat = path.stat()
    other = tmp_path / "other.safetensors"
    save_file(tensors(embed=(32, 8)) | {"embed": np.zeros((32, 8), np.float32)}, str(other))
    path.write_bytes(other.read_bytes())  # the same size, other values
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_fingerprint(folder) == before  # cached
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert weights_fingerprint(folder) != before  # read again


def test_only_headers_are_read_of_a_huge_checkpoint(tmp_path) -> None:
    """A 64 GiB tensor (a sparse file): the fingerprint reads its header and a few bytes."""
    header = json.dumps(
        {"huge": {"dtype": "F32", "shape": [1 << 34], "data_offsets": [0, 1 << 36]}}
    ).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (1 << 36))
    start = time.perf_counter()
    weights_fingerprint(path)
    assert time.perf_counter() - start < 5.0  # reading 64 GiB would take far longer


def test_malformed_headers_are_errors_not_allocations(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ValueError, match="not safetensors"):
        weights_fingerprint(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ValueError, match="not safetensors"):
        weights_fingerprint(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no weights"):
        weights_fingerprint(empty)
