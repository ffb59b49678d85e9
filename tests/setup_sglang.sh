#!/usr/bin/env bash
# Set up .venv-sglang: SGLang 0.5.23's Python code (no dependencies: they pull a CUDA torch
# 2.14 and its kernels), only what its HiCache storage modules and host KV pools import, CPU
# torch pinned, and kvstore itself, for tests/test_sglang.py and `kvstore-bench sglang`.
# Its own environment, not .venv: SGLang pins torch, triton, tokenizers and sentencepiece
# at other versions than vLLM's, and .venv holds vLLM's CPU build.
# Safe to run again; a run whose pins and pyproject.toml are unchanged does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "tests/setup_sglang.sh: $*" >&2; }

VENV=.venv-sglang
TORCH="torch==2.13.0+cpu"  # the CPU build; no other torch may come in through any package
SGLANG="sglang==0.5.23"
# what `sglang.srt.mem_cache` (storage backends, host pools) imports, beyond torch and numpy
IMPORTS=(
    "triton==3.9.0" "transformers==5.19.0" "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0"
    "sentencepiece==0.2.1" "gguf==0.19.0" "dill==0.4.1" "orjson==3.13.0" "psutil==7.2.2"
    "pybase64==1.5.1" "pydantic==2.14.4" "requests==2.34.2" "pillow==13.0.0"
    "starlette==1.10.0" "tqdm==4.70.1" "ipython==9.19.1" "aiohttp==3.14.5"
)
STAMP="$VENV/.kvstore-stamp"
want="$(printf '%s\n' "$TORCH" "$SGLANG" "${IMPORTS[@]}"; sha256sum pyproject.toml)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    step "ready (unchanged since the last run)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || { step "creating $VENV"; python3 -m venv "$VENV"; }
# --no-warn-conflicts: SGLang's own requirements (a CUDA torch 2.14, its kernels) are left
# out on purpose, and pip would list them after every install
pip=("$VENV/bin/python" -m pip install -q --no-warn-conflicts)
echo "$TORCH" >"$VENV/constraints.txt"  # for every install below: no other torch
step "upgrading pip"
"${pip[@]}" --upgrade pip
step "installing $TORCH"
"${pip[@]}" -c "$VENV/constraints.txt" "$TORCH"
step "installing $SGLANG (without its dependencies)"
"${pip[@]}" --no-deps "$SGLANG"
step "installing what SGLang's storage and host-pool modules import"
"${pip[@]}" -c "$VENV/constraints.txt" "${IMPORTS[@]}"
step "installing kvstore (editable, core dependencies)"
"${pip[@]}" -c "$VENV/constraints.txt" -e .
step "checking that SGLang's storage loader, host pools and kvstore's backend import"
"$VENV/bin/python" -W ignore::UserWarning -c "
from kvstore.bench.sglang_bench import without_torchvision
without_torchvision()
import sglang.srt.mem_cache.storage, sglang.srt.mem_cache.pool_host.mha, torch
import kvstore.integrations.sglang
assert torch.__version__ == '${TORCH#torch==}', torch.__version__
"
echo "$want" >"$STAMP"
step "ready"
