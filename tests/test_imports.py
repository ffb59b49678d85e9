"""What importing the library loads: an engine that embeds the client loads nothing of the
node (its store, tiers, cluster index, event stream) nor what only those need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

NODE_ONLY = (
    "kvstore.store",
    "kvstore.tiers",
    "kvstore.cluster",
    "kvstore.events",
    "kvstore.ingest",
    "kvstore.server",
    "redis",
    "zmq",
    "prometheus_client",
    "ml_dtypes",  # ~0.4 s: loaded once a bfloat16 or float8 block is met
)


@pytest.mark.parametrize("module", ["kvstore", "kvstore.client"])
def test_importing_loads_nothing_of_the_node(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout)
    assert module in loaded
    assert [m for m in loaded if any(m == n or m.startswith(f"{n}.") for n in NODE_ONLY)] == []
