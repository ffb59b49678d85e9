#!/usr/bin/env bash
# Set up .venv-lmcache: LMCache 0.5.6 (its multi-process server and `lmcache bench l2`) with its
# dependencies beside torch's CPU build, and kvstore with its core dependencies, for
# kvstore.integrations.lmcache's tests (tests/test_lmcache.py) and `kvstore-bench lmcache`.
# An environment of its own: LMCache pins protobuf<7 and (through grpcio-observability) grpcio
# 1.78, kvstore needs protobuf>=7.35 and grpcio>=1.85, and .venv keeps vLLM's. kvstore's pins
# win here: protobuf 7 loads LMCache's protobuf 6 modules, and grpcio-observability is only
# imported when LMCache exports OpenTelemetry metrics, which nothing here turns on.
# Safe to run again; a second run only checks its stamp of the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-lmcache
TORCH=2.13.0
LMCACHE=0.5.6
STAMP="$VENV/.kvstore-setup"
want="torch==$TORCH lmcache==$LMCACHE pyproject=$(sha256sum pyproject.toml | cut -c1-16)"

step() { echo "tests/setup_lmcache.sh: $*" >&2; }

if [ -x "$VENV/bin/lmcache" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    step "ready ($want)"
    exit 0
fi
[ -x "$VENV/bin/python" ] || { step "creating $VENV"; python3 -m venv "$VENV"; }
rm -f "$STAMP"
pip=("$VENV/bin/python" -m pip install -q)
# torch pinned to the CPU build for every install: LMCache's open `torch` would fetch CUDA's
echo "torch==$TORCH" >"$VENV/constraints.txt"
pip+=(-c "$VENV/constraints.txt")
step "upgrading pip"
"${pip[@]}" --upgrade pip
step "installing torch $TORCH (CPU build)"
"${pip[@]}" "torch==$TORCH"
step "installing LMCache $LMCACHE with its dependencies"
"${pip[@]}" "lmcache==$LMCACHE"
step "installing kvstore (editable, core dependencies; it raises protobuf and grpcio)"
# pip reports LMCache's protobuf and grpcio pins as conflicts here: the header says why not
if ! "${pip[@]}" -e . >"$VENV/kvstore-install.log" 2>&1; then
    cat "$VENV/kvstore-install.log" >&2
    exit 1
fi
step "checking that LMCache and kvstore import together"
check="import lmcache.v1.distributed.l2_adapters, kvstore.integrations.lmcache"
if ! out=$(LMCACHE_TRACK_USAGE=false "$VENV/bin/python" -c "$check" 2>&1); then
    echo "$out" >&2
    exit 1
fi
echo "$want" >"$STAMP"
step "ready ($want)"
