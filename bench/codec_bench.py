"""Codec figures on the real KV sample: what each codec does alone, and what it buys
end to end through a daemon when the link is slow (a token bucket stands for the link)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from kvstore.bench.measure import Run
from kvstore.bench.report import Row
from kvstore.client import Client
from kvstore.codecs import BFLOAT16, CODECS
from kvstore.keys import block_keys

LAYOUT = "tokens,layers,kv,heads,dim"
BLOCK_TOKENS = 256


def load_blocks(data_dir: Path) -> dict[str, list[np.ndarray]]:
    """256-token blocks of the same real KV in fp16 and bf16."""
    fp16 = np.load(data_dir / "smollm2_kv_fp16_512tok.npy")
    bf16 = np.load(data_dir / "smollm2_kv_bf16_512tok.npy").view(BFLOAT16)
    cut = range(0, len(fp16) - BLOCK_TOKENS + 1, BLOCK_TOKENS)
    return {
        "float16": [fp16[i : i + BLOCK_TOKENS] for i in cut],
        "bfloat16": [bf16[i : i + BLOCK_TOKENS] for i in cut],
    }


def codec_rows(blocks: dict[str, list[np.ndarray]], names: list[str], repeat: int) -> list[Row]:
    """Ratio, one-core encode and decode speed (raw bytes per second), and error."""
    rows = []
    for dtype, arrays in blocks.items():
        for name in names:
            codec = CODECS[name]
            if codec.dtypes and arrays[0].dtype not in codec.dtypes:
                continue
            raw = sum(a.nbytes for a in arrays)
            stored, enc, dec, errors = 0, [], [], []
            for array in arrays:
                for _ in range(repeat):
                    t = time.perf_counter()
                    payload = codec.encode(array, LAYOUT)
                    enc.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    # numpy's stubs give an ndarray the buffer protocol on Python 3.12+ only
                    view = memoryview(payload)  # type: ignore[arg-type]
                    back = codec.decode(view, array.dtype, array.shape, LAYOUT)
                    dec.append(time.perf_counter() - t)
                stored += len(payload)
                x, y = array.astype(np.float32), back.astype(np.float32)
                errors.append(float(np.linalg.norm(x - y) / np.linalg.norm(x)))
            per_block = arrays[0].nbytes
            run = Run(raw, sum(dec) / repeat, dec)
            rows.append(
                Row.of(
                    "codec",
                    "cpu",
                    per_block,
                    run,
                    codec=name,
                    dtype=dtype,
                    ratio=round(raw / stored, 4),
                    encode_gbps=round(per_block * len(enc) / sum(enc) / 1e9, 4),
                    decode_gbps=round(per_block * len(dec) / sum(dec) / 1e9, 4),
                    rel_error=round(float(np.mean(errors)), 6) if codec.lossy else 0.0,
                )
            )
    return rows


def link_rows(
    address: str,
    blocks: list[np.ndarray],
    names: list[str],
    links_gbit: list[float],
    copies: int,
    repeat: int,
) -> list[Row]:
    """Raw KV bytes delivered per second, put then get through the daemon, each request
    held to the link rate by its stored bytes; ratios against no codec on the same link.
    Each round runs every codec once, starting one further along each time, and a row
    reports the median round: this machine's speed drifts within seconds."""
    rows = []
    batch = blocks * copies
    raw = sum(b.nbytes for b in batch)
    names = ["none", *names]
    for gbit in links_gbit:
        rounds: dict[str, list[tuple[float, float, int, str]]] = {name: [] for name in names}
        for r in range(repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rounds[name].append(_put_get(address, batch, name, gbit, f"{gbit}/{r}"))
        base = None
        for name in names:
            samples = sorted(rounds[name], key=lambda s: s[0] + s[1])
            put_s, get_s, wire, chosen = samples[len(samples) // 2]
            run = Run(2 * raw, put_s + get_s, [s[0] + s[1] for s in samples])
            row = Row.of(
                "codec-transfer",
                "tcp",
                blocks[0].nbytes,
                run,
                codec=name,
                dtype=str(blocks[0].dtype),
                link_gbit=gbit or None,
                ratio=round(raw / wire, 4),
                chosen=chosen,
            )
            assert row.gbps is not None  # raw > 0 bytes moved
            base = base or row.gbps
            row.ratios["none"] = round(row.gbps / base, 3)
            rows.append(row)
    return rows


def _put_get(
    address: str, batch: list[np.ndarray], name: str, gbit: float, tag: str
) -> tuple[float, float, int, str]:
    """Seconds to put `batch` and get it back over a `gbit` link, the bytes that crossed
    it, and the codec used (what `auto` picked: its one-time choice is not timed)."""
    with Client(address, transport="tcp", codec=name, layout=LAYOUT, link_gbps=gbit or None) as c:
        keys = block_keys(np.arange(len(batch) * 16), 16, f"link/{tag}/{name}".encode())
        chosen = c._encoding(None, None, batch[:1]).codec  # `auto` chooses once, untimed
        before = c.stats().tiers[0].payload_bytes
        t = time.perf_counter()
        c.put(keys, batch)
        wire = c.stats().tiers[0].payload_bytes - before  # the bytes that crossed the link
        _hold(t, wire, gbit)
        put_s = time.perf_counter() - t
        t = time.perf_counter()
        got = c.get(keys)
        _hold(t, wire, gbit)
        get_s = time.perf_counter() - t
        if len(got) != len(batch):
            raise AssertionError(f"{name}: got {len(got)} of {len(batch)} blocks back")
        c.delete(keys)
        return put_s, get_s, wire, chosen


def _hold(start: float, nbytes: int, gbit: float) -> None:
    """Wait until `nbytes` sent at `start` could have crossed a `gbit` link (0: no link)."""
    if gbit:
        left = start + nbytes * 8 / (gbit * 1e9) - time.perf_counter()
        if left > 0:
            time.sleep(left)
