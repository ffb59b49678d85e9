"""kvstore under SGLang's HiCache (kvstore.integrations.sglang), tested with SGLang 0.5.23's
own code in its environment (.venv-sglang, made by tests/setup_sglang.sh), driven through
tests/sglang_driver.py: SGLang's storage loader builds the backend from the dynamic-backend
config under SGLang's defaults; real host KV pools (MHA and MLA, every layout) are set,
cleared and got back byte for byte through real daemons, on the node's host and over TCP;
ranks keep apart as SGLang's own backends key them; and a killed node or SGLang's fault
injector gives misses, never an exception, with the pool left as it should be.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, running_daemon
from kvstore.bench.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
DRIVER = ROOT / "tests" / "sglang_driver.py"
LAYOUTS = ("page_first", "page_first_direct", "layer_first")

pytestmark = pytest.mark.skipif(
    not PYTHON.exists(), reason="SGLang's environment is missing: run tests/setup_sglang.sh"
)


class Engine:
    """The driver process: `engine(op, **args)` is its answer; what raised there fails here."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(
                [str(PYTHON), str(DRIVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=ROOT,
            )
        assert self._answer() == {"ready": True}

    def __call__(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if "raised" in answer:
            raise AssertionError(f"SGLang's side raised {answer['raised']}\n{answer['trace']}")
        return answer["result"]

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver ended ({self.proc.wait()}): {self.log.read_text()}")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    driver = Engine(tmp_path_factory.mktemp("sglang") / "driver.log")
    yield driver
    driver.close()


@pytest.fixture
def keys(request: pytest.FixtureRequest) -> list[str]:
    """SGLang-like page keys (64 hex digits) of the test's own."""
    return [hashlib.sha256(f"{request.node.nodeid}/{i}".encode()).hexdigest() for i in range(8)]


def transfers(daemon: Daemon) -> dict[str, int]:
    with daemon.client() as client:
        return dict(client.stats().transfers)


def test_sglangs_loader_builds_the_backend_under_its_defaults(
    engine: Engine, daemon: Daemon
) -> None:
    built = engine("open_backend", name="loader", extra={"address": daemon.address})
    assert built["class"] == "kvstore.integrations.sglang.KVStoreHiCache"
    assert built["wrapper"] == "KVStoreHiCache"  # no fault injection asked for
    assert built["is_hicache_storage"]
    assert built["tp_lcm_size"] is None
    engine("close", name="loader")


@pytest.mark.parametrize("transport", ["auto", "tcp"])
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pages_come_back_byte_for_byte(
    engine: Engine, daemon: Daemon, keys: list[str], layout: str, mla: bool, transport: str
) -> None:
    name = f"{layout}-{mla}-{transport}"
    engine("open_backend", name=name, extra={"address": daemon.address,
                   "transport": transport}, layout=layout, mla=mla)  # fmt: skip
    before = engine("fill", name=name, seed=1)
    moved = transfers(daemon)
    stored = engine("call", name=name, method="batch_set_v1", keys=keys[:3], pages=[2, 0, 3])
    assert stored == [True] * 3
    assert engine("call", name=name, method="batch_exists", keys=keys[:3]) == 3
    zeroed = engine("zero", name=name)
    # keys[5] is missing: the answer stops there, and page 3 stays as it was (zeroes)
    got = engine("call", name=name, method="batch_get_v1", keys=[*keys[:2], keys[5], keys[2]],
                 pages=[2, 0, 1, 3])  # fmt: skip
    assert got == [True, True, False, False]
    after = engine("digests", name=name)
    assert [after[2], after[0]] == [before[2], before[0]]
    assert [after[1], after[3]] == [zeroed[1], zeroed[3]]
    got = engine("call", name=name, method="batch_get_v1", keys=keys[:3], pages=[2, 0, 3])
    assert got == [True] * 3
    assert engine("digests", name=name) == [before[0], zeroed[1], before[2], before[3]]
    path = "shm" if transport == "auto" else "tcp"  # the daemon shares this host
    moved = {k: v - moved.get(k, 0) for k, v in transfers(daemon).items()}
    assert moved[f"put/{path}"] == 1  # one batched call per request
    assert moved[f"get/{path}"] == 2
    engine("close", name=name)


def lookups(daemon: Daemon) -> int:
    with daemon.client() as client:
        return client.stats().lookups


def test_batch_exists_counts_the_leading_pages_held_in_one_lookup(
    engine: Engine, daemon: Daemon, keys: list[str]
) -> None:
    engine("open_backend", name="exists", extra={"address": daemon.address})
    engine("fill", name="exists", seed=2)
    engine("call", name="exists", method="batch_set_v1", keys=keys[:3], pages=[0, 1, 2])
    looked_up = lookups(daemon)
    for asked, held in [
        (keys[:5], 3),
        ([keys[0], keys[1], keys[6], keys[2]], 2),
        ([keys[6], keys[0]], 0),
        (keys[:3], 3),
    ]:
        assert engine("call", name="exists", method="batch_exists", keys=asked) == held
    assert lookups(daemon) - looked_up == 4  # one each
    assert engine("call", name="exists", method="exists", keys=[keys[2]]) is True
    assert engine("call", name="exists", method="exists", keys=[keys[3]]) is False
    engine("close", name="exists")


def test_keys_carry_the_rank_suffix_of_sglangs_file_backend(engine: Engine, tmp_path: Path) -> None:
    configs = [
        {"tp_rank": 0, "tp_size": 1},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_rank": 1, "tp_size": 2, "mla": True},
    ]
    pairs = engine("suffixes", configs=configs, directory=str(tmp_path))
    assert [ours for ours, _ in pairs] == [
        "_HuggingFaceTB-SmolLM2-135M_0_1",
        "_HuggingFaceTB-SmolLM2-135M_1_2",
        "_HuggingFaceTB-SmolLM2-135M",  # MLA: every rank holds the same KV
    ]
    assert [ours for ours, _ in pairs] == [theirs for _, theirs in pairs]


def test_tp_ranks_keep_their_pages_apart(engine: Engine, daemon: Daemon, keys: list[str]) -> None:
    ranks = {"r0of2": (0, 2), "r1of2": (1, 2), "r0of1": (0, 1)}
    for name, (rank, size) in ranks.items():
        engine("open_backend", name=name, extra={"address": daemon.address}, tp_rank=rank,
               tp_size=size)  # fmt: skip
    engine("fill", name="r0of2", seed=3)
    stored = engine("call", name="r0of2", method="batch_set_v1", keys=keys[:3], pages=[0, 1, 2])
    assert stored == [True] * 3
    held = {name: engine("call", name=name, method="batch_exists", keys=keys[:3]) for name in ranks}
    assert held == {"r0of2": 3, "r1of2": 0, "r0of1": 0}
    for name in ranks:
        engine("close", name=name)


def test_mla_ranks_share_pages_and_only_the_writer_writes(
    engine: Engine, daemon: Daemon, keys: list[str]
) -> None:
    address = {"address": daemon.address}
    engine("open_backend", name="writer", extra=address, mla=True, tp_rank=0, tp_size=2)
    engine("open_backend", name="other", extra=address, mla=True, tp_rank=1, tp_size=2)
    written = engine("fill", name="writer", seed=4)
    engine("fill", name="other", seed=5)
    # SGLang counts them stored: the writer stores the same pages
    stored = engine("call", name="other", method="batch_set_v1", keys=keys[:3], pages=[0, 1, 2])
    assert stored == [True] * 3
    assert engine("call", name="writer", method="batch_exists", keys=keys[:3]) == 0
    stored = engine("call", name="writer", method="batch_set_v1", keys=keys[:3], pages=[0, 1, 2])
    assert stored == [True] * 3
    assert engine("call", name="other", method="batch_exists", keys=keys[:3]) == 3
    zeroed = engine("zero", name="other")
    got = engine("call", name="other", method="batch_get_v1", keys=keys[:3], pages=[0, 1, 2])
    assert got == [True] * 3
    assert engine("digests", name="other") == [*written[:3], zeroed[3]]
    engine("close", name="writer")
    engine("close", name="other")


def test_the_legacy_methods_move_the_same_pages(
    engine: Engine, daemon: Daemon, keys: list[str]
) -> None:
    """SGLang's generic path (flat pages through get/set/batch_get/batch_set) and the v1
    calls read each other's pages."""
    engine("open_backend", name="legacy", extra={"address": daemon.address},
           layout="layer_first")  # fmt: skip
    before = engine("fill", name="legacy", seed=6)

    def call(method: str, keys: list[str], pages: list[int] | None = None) -> Any:
        return engine("call", name="legacy", method=method, keys=keys, pages=pages)

    assert call("set", keys[:1], [0]) is True
    assert call("batch_set", keys[1:3], [1, 2]) is True
    assert call("exists", keys[:1]) is True
    assert call("batch_exists", keys[:4]) == 3
    zeroed = engine("zero", name="legacy")
    assert call("get", keys[:1], [0]) == [True]
    assert call("batch_get", [keys[1], keys[6], keys[2]], [1, 3, 2]) == [True, False, False]
    assert engine("digests", name="legacy") == [*before[:2], *zeroed[2:]]
    engine("zero", name="legacy")
    assert call("batch_get_v1", keys[:3], [0, 1, 2]) == [True] * 3  # flat pages, read by v1
    engine("fill", name="legacy", seed=6)
    assert call("batch_set_v1", keys[3:4], [3]) == [True]
    engine("zero", name="legacy")
    assert call("get", keys[3:4], [3]) == [True]  # a v1 page, read as a flat page
    assert engine("digests", name="legacy") == [*zeroed[:3], before[3]]
    engine("close", name="legacy")


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_a_page_of_another_dtype_or_size_is_a_miss(
    engine: Engine, daemon: Daemon, keys: list[str], transport: str
) -> None:
    """What another model or layout left under a page's key is never loaded."""
    built = engine("open_backend", name="wrong", extra={"address": daemon.address,
                   "transport": transport})  # fmt: skip
    elements = built["page_bytes"] // 2
    engine("put_raw", name="wrong", keys=keys[:1], dtype="float16", shape=[elements])
    engine("put_raw", name="wrong", keys=keys[1:2], dtype="uint8", shape=[100])
    zeroed = engine("zero", name="wrong")
    for key, page in ((keys[0], 0), (keys[1], 1)):
        got = engine("call", name="wrong", method="batch_get_v1", keys=[key], pages=[page])
        assert got == [False]
        assert engine("call", name="wrong", method="get", keys=[key], pages=[page]) == [False]
    assert engine("digests", name="wrong") == zeroed
    before = engine("fill", name="wrong", seed=7)  # and the node is still used
    engine("call", name="wrong", method="batch_set_v1", keys=keys[2:3], pages=[2])
    engine("zero", name="wrong")
    assert engine("call", name="wrong", method="batch_get_v1", keys=keys[2:3], pages=[2]) == [True]
    assert engine("digests", name="wrong")[2] == before[2]
    engine("close", name="wrong")


def test_a_killed_node_is_a_miss_and_is_used_again_once_back(
    engine: Engine, keys: list[str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    extra = {"address": address, "retry_after_s": 0.2, "timeout_s": 2}

    def call(method: str, pages: list[int] | None = None) -> Any:
        return engine("call", name="down", method=method, keys=keys[:3], pages=pages)

    with running_daemon("--address", address) as node:
        engine("open_backend", name="down", extra=extra)
        before = engine("fill", name="down", seed=8)
        assert call("batch_set_v1", [0, 1, 2]) == [True] * 3
        node.process.kill()
        node.process.wait()
    logged = len(engine("logged"))
    zeroed = engine("zero", name="down")
    # every call misses (the driver would report an exception), and the pool is untouched
    assert call("batch_get_v1", [0, 1, 2]) == [False] * 3
    assert call("batch_exists") == 0
    assert call("batch_set_v1", [0, 1, 2]) == [False] * 3
    assert call("exists") is False
    assert call("batch_get", [0, 1, 2]) == [False] * 3
    assert call("batch_set", [0, 1, 2]) is False
    assert engine("digests", name="down") == zeroed
    failures = [m for m in engine("logged")[logged:] if "recomputing instead" in m]
    assert len(failures) == 1, failures  # logged once, with the reason
    engine("fill", name="down", seed=8)
    with running_daemon("--address", address):  # back, empty
        deadline = time.monotonic() + 30
        while call("batch_set_v1", [0, 1, 2]) != [True] * 3:  # after retry_after_s
            assert time.monotonic() < deadline, "the backend never used the node again"
        assert call("batch_exists") == 3
        engine("zero", name="down")
        assert call("batch_get_v1", [0, 1, 2]) == [True] * 3
        assert engine("digests", name="down")[:3] == before[:3]
    engine("close", name="down")


def test_sglangs_fault_injection_leaves_backend_and_pool_consistent(
    engine: Engine, daemon: Daemon, keys: list[str]
) -> None:
    """SGLang's injector fails (30%) and delays (up to 2 ms) calls before they reach the
    backend; what it reports stored is stored, what it reports loaded is the page set."""
    injected = {
        "SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE": "0.3",
        "SGLANG_TEST_HICACHE_BACKEND_RANDOM_DELAY": "0.002",
    }
    built = engine("open_backend", name="faulty", extra={"address": daemon.address}, pages=8,
                   environ=injected)  # fmt: skip
    assert built["wrapper"] == "HiCacheStorageFailureInjector"
    engine("open_backend", name="truth", extra={"address": daemon.address}, pages=8)
    before = engine("fill", name="faulty", seed=9)
    stored = [
        engine("call", name="faulty", method="batch_set_v1", keys=[key], pages=[page]) == [True]
        for page, key in enumerate(keys)
    ]
    held = [engine("call", name="truth", method="exists", keys=[key]) for key in keys]
    assert held == stored
    zeroed = engine("zero", name="faulty")
    loaded = [
        engine("call", name="faulty", method="batch_get_v1", keys=[key], pages=[page]) == [True]
        for page, key in enumerate(keys)
    ]
    assert all(held[page] for page, ok in enumerate(loaded) if ok)
    after = engine("digests", name="faulty")
    assert after == [before[p] if ok else zeroed[p] for p, ok in enumerate(loaded)]
    counted = engine("call", name="faulty", method="batch_exists", keys=keys)
    assert counted in (0, held.index(False) if False in held else len(keys))
    assert {True, False} <= set(stored) and {True, False} <= set(loaded)  # both happened
    engine("close", name="faulty")
    engine("close", name="truth")


def test_address_tenant_and_token_fall_back_to_the_environment(
    engine: Engine, daemon: Daemon, keys: list[str]
) -> None:
    """KVSTORE_ADDRESS and KVSTORE_TENANT stand in for the extra config's keys, which win
    over them; tenants never share a page."""
    environ = {"KVSTORE_ADDRESS": daemon.address, "KVSTORE_TENANT": "blue"}
    engine("open_backend", name="blue", extra={}, environ=environ)
    engine("open_backend", name="green", extra={"tenant": "green"}, environ=environ)
    engine("open_backend", name="also-blue", extra={"address": daemon.address, "tenant": "blue"})
    engine("fill", name="blue", seed=10)
    stored = engine("call", name="blue", method="batch_set_v1", keys=keys[:2], pages=[0, 1])
    assert stored == [True] * 2
    held = {
        name: engine("call", name=name, method="batch_exists", keys=keys[:2])
        for name in ("blue", "green", "also-blue")
    }
    assert held == {"blue": 2, "green": 0, "also-blue": 2}
    for name in held:
        engine("close", name=name)


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_a_corrupted_page_is_a_miss_and_the_node_is_still_used(
    engine: Engine, daemon: Daemon, keys: list[str], transport: str
) -> None:
    name = f"corrupt-{transport}"
    engine("open_backend", name=name, extra={"address": daemon.address,
           "transport": transport})  # fmt: skip
    before = engine("fill", name=name, seed=11)
    engine("call", name=name, method="batch_set_v1", keys=keys[:3], pages=[0, 1, 2])
    engine("corrupt", name=name, key=keys[1])
    zeroed = engine("zero", name=name)
    got = engine("call", name=name, method="batch_get_v1", keys=keys[:3], pages=[0, 1, 2])
    assert got == [False] * 3  # checked before anything is written
    assert engine("digests", name=name) == zeroed
    assert engine("call", name=name, method="batch_get_v1", keys=keys[:1], pages=[0]) == [True]
    assert engine("digests", name=name) == [before[0], *zeroed[1:]]
    engine("close", name=name)


def test_a_stalled_node_is_a_miss_after_the_timeout(engine: Engine, keys: list[str]) -> None:
    extra = {"retry_after_s": 0.2, "timeout_s": 1}
    with running_daemon() as node:
        engine("open_backend", name="stalled", extra={"address": node.address, **extra})
        engine("fill", name="stalled", seed=12)
        engine("call", name="stalled", method="batch_set_v1", keys=keys[:2], pages=[0, 1])
        node.process.send_signal(signal.SIGSTOP)
        try:
            got = engine("call", name="stalled", method="batch_get_v1", keys=keys[:2],
                         pages=[0, 1])  # fmt: skip
            held = engine("call", name="stalled", method="batch_exists", keys=keys[:2])
        finally:
            node.process.send_signal(signal.SIGCONT)
        assert (got, held) == ([False] * 2, 0)
        deadline = time.monotonic() + 30
        while engine("call", name="stalled", method="batch_exists", keys=keys[:2]) != 2:
            assert time.monotonic() < deadline, "the backend never used the node again"
    engine("close", name="stalled")
