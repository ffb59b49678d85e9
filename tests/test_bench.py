"""kvstore-bench end to end: it runs, moves verified bytes, and reports sane figures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = [sys.executable, "-m", "kvstore.bench"]
ROW_FIELDS = {"scenario", "path", "block_size", "bytes", "gbps", "p50_ms", "p99_ms", "ratios"}


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    result = bench("--quick", "--json", str(out), "--plot", str(out.with_suffix(".png")))
    assert result.returncode == 0, result.stderr
    assert "kvstore-bench transfer" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    return json.loads(out.read_text())


def test_quick_covers_sizes_directions_ceilings_and_redis(quick: dict) -> None:
    rows = quick["results"]
    assert all(set(row) >= ROW_FIELDS for row in rows)
    kv = [r for r in rows if r["path"] == "grpc"]
    assert {(r["scenario"], r["block_size"]) for r in kv} == {
        (s, b) for s in ("put", "get") for b in (256 << 10, 4 << 20)
    }
    expected = {"raw_tcp", "memcpy", "grpc_bare", "file_io"}
    if shutil.which("redis-server"):
        expected.add("redis")
        assert {"redis", "redis_pipelined"} <= {r["path"] for r in rows}
    for row in kv:
        assert set(row["ratios"]) == expected
        assert row["bytes"] == 256 << 20
        assert 0 < row["gbps"] < 1000
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        for name, ratio in row["ratios"].items():
            other = next(
                r
                for r in rows
                if r["path"] == ("redis_pipelined" if name == "redis" else name)
                and r["scenario"] == row["scenario"]
                and r["block_size"] == row["block_size"]
            )
            assert ratio > 0 and other["gbps"] > 0


def test_json_describes_machine_and_params(quick: dict) -> None:
    assert quick["machine"]["cores"] >= 1 and quick["machine"]["memory_bytes"] > 0
    assert quick["machine"]["versions"]["grpcio"]
    assert quick["params"]["quick"] is True and quick["params"]["seed"] == 0


def test_handoff_and_concurrent_streams(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    result = bench(
        "--scenarios",
        "put,get,handoff",
        "--block-sizes",
        "256KiB",
        "--total",
        "16MiB",
        "--batch",
        "8",
        "--streams",
        "1,3",
        "--repeat",
        "1",
        "--no-redis",
        "--ceilings",
        "raw_tcp",
        "--verify",
        "all",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    handoffs = [r for r in rows if r["scenario"] == "handoff"]
    assert {r["streams"] for r in handoffs} == {1, 3}
    assert all(r["gbps"] > 0 and r["handoff_s"] > 0 and "raw_tcp" in r["ratios"] for r in handoffs)


def test_lookup_reports_rates_per_prompt_length(tmp_path: Path) -> None:
    out = tmp_path / "l.json"
    result = bench(
        "lookup",
        "--prompt-tokens",
        "1024,8192",
        "--seconds",
        "0.2",
        "--repeat",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["prompt_tokens"], r["path"]) for r in rows} == {
        (n, p) for n in (1024, 8192) for p in ("grpc", "grpc-tokens")
    }
    assert all(
        r["ops_per_s"] > 0 and r["gbps"] is None and r["blocks"] == r["prompt_tokens"] // 16
        for r in rows
    )


def test_tiers_report_disk_and_demotion_beside_their_ceilings(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    result = bench(
        "tiers", "--dir", str(tmp_path), "--total", "64MiB", "--block-size", "1MiB",
        "--host-capacity", "32MiB", "--transports", "tcp", "--repeat", "1", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {
        (r["scenario"], r["path"], r.get("host_tier")): r
        for r in json.loads(out.read_text())["results"]
    }
    assert set(rows) == {
        ("put", "file_io", None), ("get", "file_io", None), ("put", "disk_tier", None),
        ("get", "disk_tier", None), ("demotion", "tcp", "empty"), ("demotion", "tcp", "full"),
    }  # fmt: skip
    assert all(r["gbps"] > 0 for r in rows.values())
    assert rows[("put", "disk_tier", None)]["ratios"]["file_io"] > 0
    full = rows[("demotion", "tcp", "full")]
    assert full["ratios"]["empty_host"] > 0 and full["demotions"] > 0 and full["disk_errors"] == 0
    assert list(tmp_path.iterdir()) == [out]  # scratch files are gone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--block-sizes", "4XB"], "not a size"),
        (["--scenarios", "put,teleport"], "unknown teleport"),
        (["--total", "1MiB", "--block-sizes", "4MiB"], "smaller than a block"),
        (["--streams", "0"], "--streams and --procs >= 1"),
        (["--procs", "0"], "--streams and --procs >= 1"),
        (["--repeat", "0"], "--repeat must be at least 1"),
        (["lookup", "--prompt-tokens", "8", "--block-size", "16"], "at least one --block-size"),
        (["tiers", "--host-capacity", "1MiB"], "--host-capacity at least four"),
    ],
)
def test_bad_arguments_are_explained(args: list[str], message: str) -> None:
    result = bench(*args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def test_ctrl_c_stops_everything_it_started() -> None:
    proc = subprocess.Popen(
        [*BENCH, "--total", "4GiB", "--no-redis"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (started := children(proc.pid)):  # wait for the daemon it starts
        assert time.monotonic() < deadline and proc.poll() is None, "no child was started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err
    for pid in started:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ), f"child {pid} outlived the benchmark"


def test_codecs_report_every_codec_on_real_kv(tmp_path: Path) -> None:
    from kvstore.codecs import CODECS

    out = tmp_path / "c.json"
    result = bench(
        "codecs",
        "--repeat",
        "1",
        "--links",
        "1,0",
        "--copies",
        "1",
        "--link-codecs",
        "auto,shuffle-zstd",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    codec_rows = [r for r in rows if r["scenario"] == "codec"]
    assert {(r["codec"], r["dtype"]) for r in codec_rows} == {
        (name, d)
        for name, codec in CODECS.items()
        for d in ("float16", "bfloat16")
        if not codec.dtypes or d in [str(t) for t in codec.dtypes]
    }
    for row in codec_rows:
        assert ROW_FIELDS | {"ratio", "encode_gbps", "decode_gbps", "rel_error"} <= set(row)
        assert row["ratio"] > 0.9 and row["encode_gbps"] > 0 and row["decode_gbps"] > 0
        assert (row["rel_error"] == 0) == (not CODECS[row["codec"]].lossy)
    links = [r for r in rows if r["scenario"] == "codec-transfer"]
    assert {(r["codec"], r["link_gbit"]) for r in links} == {
        (c, g) for c in ("none", "auto", "shuffle-zstd") for g in (1.0, None)
    }
    assert all(r["gbps"] > 0 and r["ratios"]["none"] > 0 for r in links)
    auto = {r["link_gbit"]: r for r in links if r["codec"] == "auto"}
    assert auto[None]["chosen"] == "none" and auto[None]["ratio"] == 1
    assert auto[1.0]["chosen"] in CODECS and auto[1.0]["ratio"] > 1.3  # 1 Gbit/s: compress


def test_crash_loops_check_every_acknowledged_block(tmp_path: Path) -> None:
    out = tmp_path / "crash.json"
    result = bench(
        "crash", "--loops", "2", "--kill-after", "0.3,0.8", "--threads", "2", "--processes", "2",
        "--block-sizes", "16KiB,64KiB", "--batch", "4", "--durable", "0.5", "--rate", "16MiB",
        "--host-capacity", "32MiB", "--dir", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "kvstore-bench crash" in result.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["scenario"] == "crash" and row["loops"] == 2 and len(row["per_loop"]) == 2
    assert row["acknowledged"] > 0 and 0 < row["acknowledged_durable"] <= row["acknowledged"]
    assert row["corrupt"] == row["phantom"] == row["durable_lost"] == row["earlier_lost"] == 0
    assert row["errors"] == 0 and row["within_bound"] and row["loops_failed"] == []
    assert row["loss_bound_bytes"] == (8 + 64) << 20 and row["lost_bytes_max"] >= 0
    assert row["final_checked"] <= row["acknowledged"] and 0 < row["restart_s_median"] < 60
    for loop in row["per_loop"]:
        assert {"acknowledged", "in_flight", "lost", "bound_bytes", "restart_s"} <= set(loop)
        assert loop["lost"] <= loop["acknowledged"] - loop["durable"]


def test_nixl_rows_beside_the_raw_nixl_ceiling(tmp_path: Path) -> None:
    from kvstore.fabric import why_not

    if why := why_not():
        pytest.skip(why)
    out = tmp_path / "n.json"
    result = bench(
        *("--paths", "nixl,nixl_staged", "--scenarios", "put,get", "--block-sizes", "1MiB"),
        *("--total", "8MiB", "--batch", "4", "--repeat", "1", "--no-redis", "--verify", "all"),
        *("--crossover", "64KiB", "--idle", "0.2", "--ucx-tls", "tcp", "--json", str(out)),
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["params"]["ucx"]["UCX_TLS"] == "tcp"
    rows = document["results"]
    moved = [r for r in rows if r["scenario"] in ("put", "get") and r["path"].startswith("nixl")]
    assert {(r["scenario"], r["path"]) for r in moved} == {
        (s, p) for s in ("put", "get") for p in ("nixl", "nixl_staged")
    }
    assert all(r["gbps"] > 0 and r["ratios"]["raw_nixl"] > 0 for r in moved)
    one = [r for r in rows if r["scenario"] in ("put_one", "get_one")]
    assert {(r["scenario"], r["path"]) for r in one} == {
        (s, p) for s in ("put_one", "get_one") for p in ("tcp", "nixl", "nixl:socket", "nixl:nixl")
    }
    assert all(r["block_size"] == 64 << 10 and r["p50_ms"] > 0 for r in one)
    assert all(r["ratios"]["tcp"] > 0 for r in one if r["path"] != "tcp")
    idle = {r["process"]: r for r in rows if r["scenario"] == "idle"}
    assert set(idle) == {"node", "client"}
    assert all(r["cpu_s"] >= 0 and r["seconds"] == 0.2 for r in idle.values())
