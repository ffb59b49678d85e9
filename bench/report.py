"""Rows of results, their ratios to ceilings and peers, and how they are shown."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kvstore.bench.measure import Run
from kvstore.config import format_size

CEILINGS = ("raw_tcp", "memcpy", "grpc_bare", "file_io", "raw_nixl")
PEERS = ("redis", "redis_pipelined", "grpc_unary")


@dataclass
class Row:
    scenario: str  # put, get, handoff, lookup
    path: str  # a kvstore transfer path (grpc, ...), a ceiling or a peer
    block_size: int
    bytes: int
    gbps: float | None
    p50_ms: float
    p99_ms: float
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, path: str, block_size: int, run: Run, **extra: Any) -> Row:
        gbps = round(run.gbps, 4) if run.nbytes else None
        return cls(
            scenario,
            path,
            block_size,
            run.nbytes,
            gbps,
            round(run.percentile_ms(50), 3),
            round(run.percentile_ms(99), 3),
            extra=extra,
        )

    @property
    def is_kvstore(self) -> bool:
        return self.path not in CEILINGS + PEERS


def add_ratios(rows: list[Row]) -> None:
    """kvstore / each ceiling and peer measured on the same direction and block size.

    `redis` is compared against the better of Redis's two ways (one command per
    block, or pipelined MSET/MGET). A handoff or a push is compared with the put
    ceilings: bytes leaving one process for another; a demotion with the disk's.
    """
    index = {(r.scenario, r.path, r.block_size): r for r in rows if not r.is_kvstore}
    for row in rows:
        if not row.is_kvstore or not row.gbps:
            continue
        direction = "put" if row.scenario in ("handoff", "push", "demotion") else row.scenario
        for name in CEILINGS:
            other = index.get((direction, name, row.block_size))
            if other and other.gbps:
                row.ratios[name] = round(row.gbps / other.gbps, 3)
        redis = max(
            (
                index[(direction, p, row.block_size)].gbps or 0.0
                for p in PEERS
                if (direction, p, row.block_size) in index
            ),
            default=0.0,
        )
        if redis:
            row.ratios["redis"] = round(row.gbps / redis, 3)


def machine() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            name: version(name) for name in ("kvstore", "grpcio", "protobuf", "numpy", "redis")
        },
    }


def write_json(
    path: Path, params: dict[str, Any], rows: list[Row], redis_version: str | None
) -> None:
    info = machine()
    info["versions"]["redis-server"] = redis_version
    results = []
    for row in rows:
        entry = asdict(row)
        entry.update(entry.pop("extra"))
        results.append(entry)
    document = {"machine": info, "params": params, "results": results}
    path.write_text(json.dumps(document, indent=2, default=str))  # str: a parsed value


def table(rows: list[Row], title: str) -> Any:
    from rich.table import Table

    names = (*CEILINGS, "redis", "grpc_unary", "none", "empty_host", "tcp")
    ratio_names = [n for n in names if any(n in r.ratios for r in rows)]
    codec_rows = any(r.scenario.startswith("codec") for r in rows)
    crash_rows = any(r.scenario == "crash" for r in rows)
    t = Table(title=title)
    for name in ("scenario", "path", "block", "GB/s", "p50 ms", "p99 ms"):
        t.add_column(name, justify="left" if name in ("scenario", "path") else "right")
    if codec_rows:
        for name in ("ratio", "enc GB/s", "rel err"):
            t.add_column(name, justify="right")
    if crash_rows:  # p50/p99: restart time
        for name in CRASH_COLUMNS:
            t.add_column(name, justify="right")
    for name in ratio_names:
        t.add_column(f"/{name}", justify="right")
    for r in rows:
        e = r.extra
        if r.scenario in ("lookup", "ttft") and e.get("prompt_tokens"):
            label = f"{e.get('prompt_tokens')} tok"
        elif r.scenario == "idle":
            label = f"{e['process']}, {e['seconds']:g} s"
        else:
            label = format_size(r.block_size)
        path = r.path
        if r.scenario == "ttft":
            same = "identical" if e["identical_tokens"] else f"{e['token_agreement']:.0%} agree"
            path = f"{e['codec']} {e['device']}, {same}, next token {e['next_token_top1']:.1%}"
        if r.scenario.startswith("codec"):
            link = f" @{e['link_gbit']:g}Gb" if e.get("link_gbit") else ""
            path = f"{e['codec']} {e['dtype'].replace('float', 'f')}{link}"
        if r.gbps is not None:
            speed = f"{r.gbps:.2f}"
        elif "speedup" in e:
            speed = f"x{e['speedup']:g} ttft"
        elif "ops_per_s" in e:
            speed = f"{e['ops_per_s']:.0f}/s"
        elif "core_fraction" in e:
            speed = f"{e['core_fraction']:.2%} core"
        else:
            speed = ""
        cells = [r.scenario, path, label, speed, f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"]
        if codec_rows:
            cells += [
                f"{e['ratio']:.3f}" if "ratio" in e else "",
                f"{e['encode_gbps']:.3f}" if "encode_gbps" in e else "",
                f"{e['rel_error']:.4f}" if "rel_error" in e else "",
            ]
        if crash_rows:
            cells += crash_cells(e) if r.scenario == "crash" else [""] * len(CRASH_COLUMNS)
        cells += [f"{r.ratios[n]:.2f}" if n in r.ratios else "" for n in ratio_names]
        t.add_row(*cells, style="bold" if r.is_kvstore else "dim")
    return t


CRASH_COLUMNS = (
    "loops", "acked", "durable", "corrupt", "phantom", "lost", "max MiB/bound", "durable lost",
)  # fmt: skip


def crash_cells(e: dict[str, Any]) -> list[str]:
    """A `crash` row's figures; the bound is the README's loss bound for one loop."""
    bound = f"{e['lost_bytes_max'] / 2**20:.1f}/{e['loss_bound_bytes'] / 2**20:.0f}"
    figures = ("loops", "acknowledged", "acknowledged_durable", "corrupt", "phantom", "lost")
    return [str(e[name]) for name in figures] + [
        bound + ("" if e["within_bound"] else " OVER"),
        str(e["durable_lost"]),
    ]


def plot(path: Path, rows: list[Row]) -> None:
    """Throughput vs block size: one line per kvstore path and peer, ceilings dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({r.scenario for r in rows if r.gbps})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for name in sorted({r.path for r in rows if r.scenario == scenario}):
            points = sorted(
                (r.block_size, r.gbps)
                for r in rows
                if r.scenario == scenario and r.path == name and r.gbps
            )
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "--" if name in CEILINGS else "-"
            ax.plot(xs, ys, style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (bytes)")
        ax.set_ylabel("GB/s")
        ax.set_title(scenario)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
