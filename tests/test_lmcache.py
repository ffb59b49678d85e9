"""kvstore under LMCache (kvstore.integrations.lmcache), run by LMCache 0.5.6 itself in its own
environment (.venv-lmcache, made by tests/setup_lmcache.sh): `lmcache bench l2` checking every
byte, a `lmcache server` storing into and loading from a node, and the adapter's locks and
failures against daemons that restart and die (tests/lmcache_driver.py is LMCache's side)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import Daemon, running_daemon
from kvstore.bench.procs import free_port
from kvstore.results import TierStats

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lmcache" / "bin"
DRIVER = str(Path(__file__).with_name("lmcache_driver.py"))
ENV = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "LMCACHE_DISABLE_BANNER": "1"}
SHAPE = "(2,64,16,2,64):float16:4"  # 4 layers, 2 heads of 64: 512 KiB chunks of 256 tokens

pytestmark = pytest.mark.skipif(
    not (VENV / "lmcache").exists(), reason="LMCache's environment: run tests/setup_lmcache.sh"
)


def plugin(address: str, **params: object) -> str:
    """The `--l2-adapter` JSON that loads kvstore's adapter."""
    return json.dumps(
        {
            "type": "plugin",
            "module_path": "kvstore.integrations.lmcache",
            "class_name": "KVStoreL2Adapter",
            "adapter_params": {"address": address, **params},
        }
    )


def host_tier(node: Daemon) -> TierStats:
    with node.client() as client:
        return next(tier for tier in client.stats().tiers if tier.name == "host")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_lmcache_bench_l2_checks_every_byte_through_the_node(transport, tmp_path) -> None:
    summary = tmp_path / "bench.json"
    with running_daemon("--host-capacity", "64MiB") as node:
        run = subprocess.run(
            [str(VENV / "lmcache"), "bench", "l2", "--no-skip-verify",
             "--l2-adapter", plugin(node.address, transport=transport),
             "--lookup-max-hit-rate", "1.0", "--format", "json", "--output", str(summary)],
            env=ENV, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "[Verify] All 32 keys data verified OK." in run.stdout
        with node.client() as client:
            stats = client.stats()
        assert host_tier(node).blocks == 64  # a warm-up round and a measured one, 32 keys each
    store, lookup, load = (json.loads(summary.read_text())["metrics"][f"op_{i}"] for i in range(3))
    assert store["total_success"] == lookup["total_success"] == load["total_success"] == 32
    assert stats.transfers[f"put/{transport}"] == 2  # one batched put per store task
    if transport == "tcp":
        assert stats.transfers["get/tcp"] == 2  # one get per load task, straight into place
    else:
        assert stats.transfers["get/shm"] == 2  # the lookups' leases: loads copy from them


def test_lmcache_server_stores_into_the_node_and_loads_back_from_it() -> None:
    """A prompt stored through `lmcache server` reaches the node; with LMCache's own cache
    (L1) cleared and the worker's pages zeroed, the prompt comes back from the node."""
    rpc, http = free_port(), free_port()
    with running_daemon("--host-capacity", "64MiB") as node:
        server = subprocess.Popen(
            [str(VENV / "lmcache"), "server", "--l1-size-gb", "0.25", "--eviction-policy", "LRU",
             "--host", "127.0.0.1", "--port", str(rpc), "--http-host", "127.0.0.1",
             "--http-port", str(http), "--supported-transfer-mode", "engine_driven",
             "--l2-adapter", plugin(node.address)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            log = wait_for_line(server, "Uvicorn running on")
            story = subprocess.run(
                [str(VENV / "python"), DRIVER, "server", f"tcp://127.0.0.1:{rpc}",
                 f"http://127.0.0.1:{http}", SHAPE, node.address],
                env=ENV, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert story.returncode == 0, story.stderr[-3000:] + "".join(log[-30:])
            host = host_tier(node)
            assert (host.blocks, host.hits) == (2, 2)  # the prompt's two chunks, read back once
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    assert json.loads(story.stdout) == {
        "chunks": 2,
        "cold_hits": 0,
        "stored": True,
        "warm_hits": 2,
        "retrieved": True,
        "zeroed": True,
        "restored": True,
    }


def wait_for_line(process: subprocess.Popen, text: str) -> list[str]:
    """Read `process`'s stderr until a line holds `text` (it is serving then); the rest is
    read on by a thread, so the process never blocks on a full pipe: its lines so far."""
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True).start()
            return lines
    raise AssertionError(f"it ended before saying {text!r}: {''.join(lines[-20:])}")


class Session:
    """The driver holding one adapter made by LMCache's loader: a command in, a JSON out."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def __call__(self, command: str) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        assert "raised" not in answer, answer  # nothing the adapter does raises into LMCache
        return answer


@contextmanager
def adapter_session(address: str, **params: object) -> Iterator[Session]:
    process = subprocess.Popen(
        [str(VENV / "python"), DRIVER, "adapter", plugin(address, **params)],
        env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline()) == {"ready": True}
        yield Session(process)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=60) == 0


def test_unlock_completes_after_the_node_restarts_and_locks_work_again() -> None:
    address = f"127.0.0.1:{free_port()}"
    flags = ("--host-capacity", "64MiB", "--address", address)
    with adapter_session(address, retry_after_s=60) as adapter:
        with running_daemon(*flags):
            assert adapter("store 0 4") == {"ok": True}
            assert adapter("lock 0 6")["found"] == [0, 1, 2, 3]
            assert adapter("status")["leases"] == 1
        with running_daemon(*flags):  # the node restarted: the leases died with the old one
            assert adapter("unlock 0 6") == {"unlocked": 6}  # bookkeeping: nothing to raise
            assert adapter("status")["leases"] == 0
            assert adapter("lock 0 4")["found"] == []  # the new node is met anew, empty
            assert adapter("store 0 4") == {"ok": True}
            assert adapter("lock 0 4")["found"] == [0, 1, 2, 3]
            assert adapter("load 0 4") == {"found": [0, 1, 2, 3], "whole": [True] * 4}
            adapter("unlock 0 4")
            assert adapter("load 0 6") == {"found": [0, 1, 2, 3], "whole": [True] * 4 + [False] * 2}
            status = adapter("status")
            assert (status["leases"], status["locked_keys"], status["counts"]) == (0, 0, {})


def test_lookups_find_the_chunks_every_rank_holds() -> None:
    """LMCache asks for rows of chunks, one row per rank; kvstore answers prefixes, so the
    adapter asks chunk by chunk across the rows: the chunks every rank holds are found."""
    with (
        running_daemon("--host-capacity", "64MiB") as node,
        adapter_session(node.address) as adapter,
    ):
        assert adapter("store 0 3 1") == {"ok": True}  # rank 0: chunks 0, 1, 2
        assert adapter("store 0 2 2") == {"ok": True}  # rank 1: chunks 0, 1 (rank 0's existed)
        # rows of 4 chunks, rank 0's then rank 1's: rank 1 lacks chunk 2, so the found
        # prefix ends there (rank 0's chunk 2 is found too; LMCache unlocks what it cannot use)
        assert adapter("lock 0 4 2")["found"] == [0, 1, 2, 4, 5]
        load = adapter("load 0 4 2")
        assert load["found"] == [0, 1, 2, 4, 5]
        assert load["whole"] == [True, True, True, False, True, True, False, False]
        adapter("unlock 0 4 2")
        assert adapter("status")["leases"] == 0
        with node.client() as client:
            tiers = client.stats().tiers
        assert adapter("usage") == {
            "used": sum(tier.bytes for tier in tiers),  # the node's own figures
            "capacity": sum(tier.capacity for tier in tiers),
        }
        adapter("delete 1 1 2")  # chunk 1 of both ranks
        assert adapter("lock 0 4 2")["found"] == [0, 4]


FAILED = {
    "store 3 2": ("store", {"ok": False}),
    "lock 0 3": ("lookup", {"found": []}),
    "load 0 3": ("load", {"found": [], "whole": [False] * 3}),
}


@pytest.mark.parametrize("first", list(FAILED))
def test_a_killed_node_fails_tasks_and_never_raises(first: str) -> None:
    """Each kind of task meets the dead node first in one of the runs (after a failure the
    guard leaves the node alone: later tasks fail without trying)."""
    with (
        running_daemon("--host-capacity", "64MiB") as node,
        adapter_session(node.address, timeout_s=5, retry_after_s=60) as adapter,
    ):
        assert adapter("store 0 3") == {"ok": True}
        assert adapter("lock 0 3")["found"] == [0, 1, 2]
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        assert adapter("unlock 0 3") == {"unlocked": 3}
        for command in sorted(FAILED, key=lambda c: c != first):
            assert adapter(command) == FAILED[command][1]
        status = adapter("status")
        assert (status["is_healthy"], status["leases"]) == (False, 0)
        assert status["counts"][f"{FAILED[first][0]}_failed"] == 1
        assert adapter("close") == {"closed": True}
