"""A replay's figures: the row the bench reports, the table it prints, the plot it draws."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench import trace_metrics as metrics
from kvstore.bench.report import Row
from kvstore.bench.trace_format import Request
from kvstore.bench.trace_refs import Hits, hit_tokens, token_ratio
from kvstore.bench.trace_replay import Outcome

# The model whose KV the capacities are also given in (--kv-bytes-per-token's default):
KV_MODEL = "Llama-3.1-8B bf16: 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes"
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # 128 KiB a token, 64 MiB a 512-token block
GIB = 1 << 30
POLICY_ORDER = ("cost", "prefix", "random")


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 3) if seconds else 0.0


def load_figures(out: Outcome, nodes: int) -> dict[str, Any]:
    """Prefill work per node: over the run, and over sliding windows of requests."""
    served = [(n, w) for n, w in zip(out.node_of, out.work(), strict=True) if n >= 0]
    node_of, work = [n for n, _ in served], [w for _, w in served]
    if not work:
        return {}
    window = metrics.windows(node_of, work, nodes)
    return {
        "load_max_over_mean": round(metrics.spread(node_of, work, nodes), 4),
        "load_max_over_mean_window": round(window["max"], 4),
        "load_window": {k: round(v, 4) for k, v in window.items()},
        "load_window_1000_max": round(metrics.windows(node_of, work, nodes, 1000)["max"], 4),
        "load_balanced_window": metrics.shortest_balanced_window(node_of, work, nodes),
    }


def extra(
    requests: Sequence[Request],
    out: Outcome,
    refs: dict[str, Hits],
    *,
    nodes: int,
    capacity_blocks: int,
    tokens_per_block: int,
    kv_bytes_per_token: int,
) -> dict[str, Any]:
    """The row's `extra`: what the issue asks for, then what explains it."""
    blocks = sum(out.blocks)
    hit_ratio = sum(out.hits) / blocks if blocks else 0.0
    gib = tokens_per_block * kv_bytes_per_token / GIB  # real KV of one block
    ref = {name: hits.ratio(requests) for name, hits in refs.items()}
    figures = {
        "requests": len(out.blocks),
        "nodes": nodes,
        "capacity_blocks": capacity_blocks,
        "capacity_gib": round(capacity_blocks * gib, 2),
        "hit_ratio": round(hit_ratio, 5),
        "token_hit_ratio": round(token_ratio(requests, out.hits, tokens_per_block), 5),
        "prefill_tokens": sum(r.input_length for r in requests),
        "prefill_tokens_saved": hit_tokens(requests, out.hits, tokens_per_block),
        "ref_infinite": round(ref["infinite"], 5),
        "ref_single_lru": round(ref["single_lru"], 5),
        "ref_belady": round(ref["belady"], 5),
        "vs_infinite": ratio(hit_ratio, ref["infinite"]),
        "vs_single_lru": ratio(hit_ratio, ref["single_lru"]),
        "vs_belady": ratio(hit_ratio, ref["belady"]),
        **load_figures(out, nodes),
        "hits_by_tier": dict(out.hits_by_tier),
        "fetched_blocks": out.fetched,
        "verified_blocks": out.verified,
        "corrupt": out.corrupt,
        "errors": out.errors,
        "failovers": out.failovers,
        "requests_per_s": round(len(out.blocks) / out.seconds, 2) if out.seconds else None,
        "locate_p50_ms": percentile_ms(out.locate_s, 50),
        "locate_p99_ms": percentile_ms(out.locate_s, 99),
        "locate_exact": ratio(
            sum(p == h for p, h in zip(out.predicted, out.hits, strict=True)), len(out.hits)
        ),
        "hit_ratio_over_time": [
            round(x, 4) for x in metrics.hit_ratio_over_time(out.blocks, out.hits)
        ],
        "kv_bytes_per_token": kv_bytes_per_token,
    }
    for name in ("lru_disk", "lru_host_disk"):
        if name in ref:
            figures[f"ref_{name}"] = round(ref[name], 5)
            figures[f"vs_{name}"] = ratio(hit_ratio, ref[name])
    return figures


def row(path: str, block_bytes: int, out: Outcome, figures: dict[str, Any]) -> Row:
    gbps = out.bytes_moved / out.seconds / 1e9 if out.seconds else None
    return Row(
        "trace",
        path,
        block_bytes,
        out.bytes_moved,
        round(gbps, 4) if gbps else None,
        percentile_ms(out.latency_s, 50),
        percentile_ms(out.latency_s, 99),
        extra=figures,
    )


def table(rows: Sequence[Row]) -> Any:
    from rich.table import Table

    t = Table(title="kvstore-bench trace: live replay against the offline references")
    heads = (
        "router",
        "nodes",
        "capacity",
        "hits",
        "/LRU",
        "/Belady",
        "/unbounded",
        "load",
        "load 100-window",
        "req/s",
        "locate p50/p99 ms",
        "failovers",
        "corrupt, errors",
    )
    for name in heads:
        t.add_column(name, justify="left" if name == "router" else "right")
    for r in rows:
        e = r.extra
        t.add_row(
            r.path,
            str(e["nodes"]),
            f"{e['capacity_blocks']} ({e['capacity_gib']:g} GiB)",
            f"{e['hit_ratio']:.2%}",
            f"{e['vs_single_lru']}",
            f"{e['vs_belady']}",
            f"{e['vs_infinite']}",
            f"{e.get('load_max_over_mean', 0):.3f}",
            f"{e.get('load_max_over_mean_window', 0):.2f}",
            f"{e['requests_per_s']}",
            f"{e['locate_p50_ms']:.2f} / {e['locate_p99_ms']:.2f}",
            str(e["failovers"]),
            f"{e['corrupt']}, {e['errors']}",
        )
    return t


def plot(path: Path, rows: Sequence[Row]) -> None:
    """Hit ratio against capacity (blocks below, GiB of real KV above): a colour per
    router, a line style per node count (one node is one line: no routing), and the
    offline references in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    fig, ax = plt.subplots(figsize=(9, 5.5))
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    refs: dict[str, dict[int, float]] = {"unbounded": {}, "one LRU": {}, "Belady's MIN": {}}
    for r in rows:
        e = r.extra
        c = e["capacity_blocks"]
        key = ("one node", 1) if e["nodes"] == 1 else (r.path, e["nodes"])
        series.setdefault(key, []).append((c, e["hit_ratio"]))
        refs["unbounded"][c] = e["ref_infinite"]
        refs["one LRU"][c] = e["ref_single_lru"]
        refs["Belady's MIN"][c] = e["ref_belady"]
    colours = dict(
        zip(["one node", *POLICY_ORDER], ["black", "C0", "C1", "C2", "C3"], strict=False)
    )
    styles = ["-", "--", ":", "-."]
    counts = sorted({n for _, n in series})
    for (name, nodes), points in sorted(series.items()):
        xs, ys = zip(*sorted(dict(points).items()), strict=True)
        label = name if nodes == 1 else f"{name}, {nodes} nodes"
        ax.plot(
            xs,
            ys,
            styles[counts.index(nodes) % 4],
            marker="o",
            ms=4,
            color=colours.get(name.split("+")[0], "C4"),
            label=label,
        )
    for (name, ratios), style in zip(refs.items(), ["-", "--", ":"], strict=True):
        xs, ys = zip(*sorted(ratios.items()), strict=True)
        ax.plot(xs, ys, style, color="gray", lw=2, alpha=0.6, label=f"offline: {name}")
    ax.set_xlabel("capacity (blocks, all nodes)")
    ax.set_ylabel("hit ratio (leading-prefix hit blocks / blocks)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    e = rows[0].extra if rows else {}
    if e.get("capacity_blocks"):
        per_block = e["capacity_gib"] / e["capacity_blocks"]
        top = ax.secondary_xaxis(
            "top", functions=(lambda b: b * per_block, lambda g: g / per_block)
        )
        top.xaxis.set_major_formatter(plain)
        top.xaxis.set_minor_formatter(plain)
        top.set_xlabel(
            f"GiB of real KV ({e.get('kv_model') or 'per --kv-bytes-per-token'})", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
