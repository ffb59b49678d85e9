"""LMCache's side of tests/test_lmcache.py, run by .venv-lmcache's python: LMCache's own code
(its adapter loader, memory objects and server client) against the nodes the tests start.

    lmcache_driver.py server RPC_URL HTTP_URL SHAPE NODE   one prompt through `lmcache server`
    lmcache_driver.py adapter ADAPTER_JSON                 commands on stdin, a JSON line each

The adapter's commands `store|lock|load|unlock|delete FIRST COUNT [ROWS]` name chunks
FIRST..FIRST+COUNT of ROWS rows (ranks): a task over them, waited for on the adapter's event
fd as LMCache's controllers wait; `status`, `usage` and `close` call the adapter's own.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.l2_adapters import create_l2_adapter
from lmcache.v1.distributed.l2_adapters.config import parse_args_to_l2_adapters_config
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj
from lmcache.v1.platform import consume_fd

OBJECT_BYTES = 64 << 10
WAIT_S = 60.0  # a task not done by then is a hang: the test fails on it


def server_story(rpc_url: str, http_url: str, shape: str, node: str) -> dict:
    """Store a prompt through the server (L1, then kvstore `node`), drop L1, zero the
    worker's pages and retrieve the prompt again: every chunk comes back from kvstore."""
    from lmcache.cli.commands.bench.server_bench.client import ServerBenchClient
    from lmcache.cli.commands.bench.server_bench.config import BenchConfig

    config = BenchConfig(
        rpc_url=rpc_url,
        http_url=http_url,
        mode="cpu",
        transfer_mode="engine_driven",  # the worker's own pages, zeroed and checked here
        tp_size=1,
        use_mla=False,
        num_tokens=512,
        kvcache_shape_spec=shape,
        num_blocks=64,
        block_size=16,
    )
    client = ServerBenchClient(config, lambda line: print(line, file=sys.stderr))
    client.start()
    try:
        cold = client.create_request(0, "cold", "cold")
        assert cold is not None
        tokens = cold.num_full_tokens
        cold_hits = client.lookup(cold).hit_chunks
        stored = client.compute_checksums(cold, 0, tokens)
        store = client.store(cold, 0, tokens)
        client.end_session(cold)
        wait_stored(node, cold.total_chunks)  # the server writes L2 after STORE returns
        clear = urllib.request.Request(f"{http_url}/cache/clear", b"{}", method="POST")
        clear.add_header("Content-Type", "application/json")
        urllib.request.urlopen(clear, timeout=30).close()
        warm = client.create_request(0, "warm", "warm")
        assert warm is not None
        client.zero_destination(warm, 0, tokens)
        zeroed = client.compute_checksums(warm, 0, tokens)
        warm_hits = client.lookup(warm).hit_chunks
        retrieve = client.retrieve(warm, 0, tokens)
        restored = client.compute_checksums(warm, 0, tokens)
        client.end_session(warm)
    finally:
        client.close()
    return {
        "chunks": cold.total_chunks,
        "cold_hits": cold_hits,
        "stored": bool(store and store.succeeded),
        "warm_hits": warm_hits,
        "retrieved": bool(retrieve and retrieve.succeeded),
        "zeroed": zeroed != stored,
        "restored": restored == stored,
    }


def wait_stored(node: str, blocks: int) -> None:
    """Until the node's event stream (a fresh node's, from its start) says `blocks` blocks
    were stored."""
    from kvstore.client import Client
    from kvstore.events.schema import BlockStored

    with Client(node, timeout=WAIT_S) as client:
        stored = 0
        for batch in client.watch(from_sequence=0):
            stored += sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockStored))
            if stored >= blocks:
                return


class AdapterDriver:
    """One adapter made by LMCache's own loader. Its objects are LMCache's own memory
    objects, keyed as LMCache keys them: `rows` rows (one per rank) of chunks, row by row."""

    def __init__(self, spec: str) -> None:
        configs = parse_args_to_l2_adapters_config(argparse.Namespace(l2_adapter=[spec]))
        self.adapter = create_l2_adapter(configs.adapters[0])

    def run(self, command: str, first: int, count: int, rows: int = 1) -> dict:
        adapter = self.adapter
        cells = [(row, chunk) for row in range(rows) for chunk in range(first, first + count)]
        keys = [ObjectKey(chunk.to_bytes(16, "big"), "driver-model", row) for row, chunk in cells]
        if command == "store":
            task = adapter.submit_store_task(keys, [memory_object(expected(*c)) for c in cells])
            done: dict = {}
            while task not in done:
                wait_signal(adapter.get_store_event_fd())
                done |= adapter.pop_completed_store_tasks()
            return {"ok": done[task].is_successful()}
        if command == "lock":
            task = adapter.submit_lookup_and_lock_task(keys, {})
            fd = adapter.get_lookup_and_lock_event_fd()
            return {"found": wait_bitmap(fd, adapter.query_lookup_and_lock_result, task)}
        if command == "load":
            into = [memory_object(np.zeros(OBJECT_BYTES, np.uint8)) for _ in cells]
            task = adapter.submit_load_task(keys, into)
            found = wait_bitmap(adapter.get_load_event_fd(), adapter.query_load_result, task)
            held = [obj.raw_data.numpy() for obj in into]
            whole = [np.array_equal(h, expected(*c)) for h, c in zip(held, cells, strict=True)]
            return {"found": found, "whole": whole}
        if command == "unlock":
            adapter.submit_unlock(keys)  # returns: it raised nothing
            return {"unlocked": len(keys)}
        if command == "delete":
            adapter.delete(keys)
            return {"deleted": len(keys)}
        raise ValueError(f"unknown command {command!r}")


def memory_object(data: np.ndarray) -> TensorMemoryObj:
    meta = MemoryObjMetadata(
        torch.Size([OBJECT_BYTES]), torch.uint8, 0, OBJECT_BYTES, MemoryFormat.KV_2LTD
    )
    return TensorMemoryObj(torch.from_numpy(data.copy()), meta, None)


def expected(row: int, chunk: int) -> np.ndarray:
    """The bytes of one object: seeded by where it is."""
    return np.random.default_rng([row, chunk]).integers(0, 256, OBJECT_BYTES, dtype=np.uint8)


def wait_signal(fd: int) -> None:
    if not select.select([fd], [], [], WAIT_S)[0]:
        raise TimeoutError("the adapter never signalled its event fd")
    consume_fd(fd)


def wait_bitmap(fd: int, query: Callable[[int], Any], task: int) -> list[int]:
    while (found := query(task)) is None:
        wait_signal(fd)
    return found.get_indices_list()


def adapter_session(spec: str) -> None:
    driver = AdapterDriver(spec)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *numbers = line.split()
        try:
            if command == "status":
                answer = driver.adapter.report_status()
            elif command == "usage":
                usage = driver.adapter.get_usage()
                answer = {"used": usage.total_bytes_used, "capacity": usage.total_capacity_bytes}
            elif command == "close":
                driver.adapter.close()
                answer = {"closed": True}
            else:
                answer = driver.run(command, *map(int, numbers))
        except Exception as exc:  # what the adapter let out: the tests assert there is none
            answer = {"raised": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "server":
        print(json.dumps(server_story(*args)), flush=True)
    else:
        adapter_session(*args)


if __name__ == "__main__":
    main()
