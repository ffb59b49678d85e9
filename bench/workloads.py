"""kvstore's own workloads, and Redis doing the same work as a peer."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import xxhash

from kvstore.bench.measure import Run, Workload, timed_batches
from kvstore.client import Client
from kvstore.keys import block_keys


class Verifier:
    """Checks received blocks against the source: every `stride`-th block (1 = all, 0 = none)."""

    def __init__(self, source: np.ndarray, block_size: int, stride: int) -> None:
        self.source, self.block_size, self.stride = source, block_size, stride
        self.checked = 0

    def wants(self, index: int) -> bool:
        return self.stride > 0 and index % self.stride == 0

    def check(self, index: int, received: np.ndarray) -> None:
        sent = self.source[index * self.block_size : (index + 1) * self.block_size]
        if received.nbytes != sent.nbytes or xxhash.xxh3_64_intdigest(
            received.data
        ) != xxhash.xxh3_64_intdigest(sent.data):
            raise AssertionError(f"block {index} came back different from what was sent")
        self.checked += 1


def bench_keys(work: Workload, tag: str) -> list[bytes]:
    """Fresh keys for one measurement, so every put really stores."""
    return block_keys(np.arange(work.blocks), 1, f"kvstore-bench/{tag}".encode())


def clients(address: str, path: str, streams: int, chunk: int, source: np.ndarray) -> list[Client]:
    """One client per stream, kept for a whole run as an engine keeps its client: one-time
    costs (connections, mapping the shared arena) land in the warm-up, not in timings.
    Over `nixl` each registers `source` once, so puts of views of it cost no copy here
    (`nixl_staged` registers nothing: a copy through the client's staging memory)."""
    made = [Client(address, chunk_size=chunk, transport=_transport(path)) for _ in range(streams)]
    if path == "nixl":
        for client in made:
            client.register(source)
    return made


def get_buffers(clients: list[Client], path: str, nbytes: int) -> list[np.ndarray]:
    """One reused get buffer per client, as an engine receives into its own staging memory
    (fresh memory for every request would measure page faults, not transfer); over `nixl`,
    registered once, so the node writes blocks straight into it."""
    buffers = [np.empty(nbytes, np.uint8) for _ in clients]
    if path == "nixl":
        for client, buffer in zip(clients, buffers, strict=True):
            client.register(buffer)
    return buffers


def kvstore_put(
    clients: list[Client], work: Workload, source: np.ndarray, keys: list[bytes]
) -> Run:
    size = work.block_size

    def request(client: Client, batch: range) -> None:
        client.put([keys[i] for i in batch], [source[i * size : (i + 1) * size] for i in batch])

    return _concurrently(clients, work, request)


def kvstore_get(
    clients: list[Client],
    path: str,
    work: Workload,
    keys: list[bytes],
    verifier: Verifier,
    buffers: list[np.ndarray],
) -> Run:
    """Gets into `buffers` (one per client, of a batch at least: `get_buffers`)."""
    outs = {id(client): buffer for client, buffer in zip(clients, buffers, strict=True)}

    def request(client: Client, batch: range) -> None:
        if path == "lease":  # zero-copy views, released at once: the cost of a lease
            with client.lease([keys[i] for i in batch]) as lease:
                check(batch, lease.blocks)
            return
        out = outs[id(client)][: len(batch) * work.block_size]
        check(batch, client.get([keys[i] for i in batch], out=out))

    def check(batch: range, blocks: list[np.ndarray]) -> None:
        if len(blocks) != len(batch):
            raise AssertionError(f"get returned {len(blocks)} of {len(batch)} blocks")
        for i, block in zip(batch, blocks, strict=True):
            if verifier.wants(i):
                verifier.check(i, block)

    return _concurrently(clients, work, request)


def _concurrently(
    clients: list[Client], work: Workload, request: Callable[[Client, range], None]
) -> Run:
    """One thread per client, each taking every `len(clients)`-th batch."""
    if len(clients) == 1:
        return timed_batches(work, lambda batch: request(clients[0], batch))
    batches = list(work.batches())
    latencies: list[float] = []

    def worker(n: int) -> None:
        for batch in batches[n :: len(clients)]:
            t = time.perf_counter()
            request(clients[n], batch)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(worker, range(len(clients))))
    return Run(work.blocks * work.block_size, time.perf_counter() - start, latencies)


def redis_put(
    url: str, work: Workload, source: np.ndarray, keys: list[bytes], pipelined: bool
) -> Run:
    import redis

    size = work.block_size
    with redis.Redis.from_url(url) as r:

        def request(batch: range) -> None:
            if pipelined:
                r.mset({b"b:" + keys[i]: source[i * size : (i + 1) * size].data for i in batch})
            else:
                for i in batch:
                    r.set(b"b:" + keys[i], source[i * size : (i + 1) * size].data)

        return timed_batches(work, request)


def redis_get(
    url: str, work: Workload, keys: list[bytes], pipelined: bool, verifier: Verifier
) -> Run:
    import redis

    with redis.Redis.from_url(url) as r:

        def request(batch: range) -> None:
            names = [b"b:" + keys[i] for i in batch]
            values = r.mget(names) if pipelined else [r.get(name) for name in names]
            for i, value in zip(batch, values, strict=True):
                if value is None:
                    raise AssertionError(f"redis lost block {i}")
                if verifier.wants(i):
                    verifier.check(i, np.frombuffer(value, np.uint8))

        run = timed_batches(work, request)
        r.flushdb()
        return run


def handoff(
    address: str,
    path: str,
    work: Workload,
    source: np.ndarray,
    keys: list[bytes],
    verifier: Verifier,
) -> Run:
    """A producer process puts a prompt's blocks batch by batch, as prefill makes them; a
    consumer process gets each as soon as it is there. Time: first put to last byte."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Barrier(3), ctx.Queue()
    consumer = ctx.Process(target=_consume, args=(address, path, work, keys, ready, results))
    producer = ctx.Process(
        target=_produce, args=(address, path, work, source, keys, ready, results)
    )
    consumer.start()
    producer.start()
    try:
        ready.wait(timeout=120)
        outcome = dict(results.get(timeout=600) for _ in range(2))
    finally:
        for proc in (producer, consumer):
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if "error" in outcome:
        raise AssertionError(outcome["error"])
    with Client(address, transport=_transport(path)) as client:  # verify outside the timing
        for i in filter(verifier.wants, range(work.blocks)):
            verifier.check(i, client.get([keys[i]])[0])
    first_put, (last_byte, latencies) = outcome["first_put"], outcome["last_byte"]
    return Run(work.blocks * work.block_size, last_byte - first_put, latencies)


def _produce(address, path, work, source, keys, ready, results) -> None:
    size = work.block_size
    try:
        with Client(address, chunk_size=work.chunk, transport=_transport(path)) as client:
            ready.wait()
            results.put(("first_put", time.monotonic()))  # CLOCK_MONOTONIC: system-wide
            for batch in work.batches():
                client.put(
                    [keys[i] for i in batch], [source[i * size : (i + 1) * size] for i in batch]
                )
    except Exception as exc:
        results.put(("error", f"producer failed: {exc!r}"))


def _consume(address, path, work, keys, ready, results) -> None:
    received, latencies = 0, []
    try:
        with Client(address, transport=_transport(path)) as client:
            ready.wait()
            deadline = time.monotonic() + 300
            while received < work.blocks:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {received} of {work.blocks} blocks arrived")
                t = time.perf_counter()
                got = client.get(keys[received : received + work.batch])
                if got:
                    latencies.append(time.perf_counter() - t)
                    received += len(got)
                else:
                    time.sleep(0.0002)  # nothing new yet: the producer is ahead of us next
            results.put(("last_byte", (time.monotonic(), latencies)))
    except Exception as exc:  # reported to the parent, which fails loudly
        results.put(("error", f"consumer failed: {exc!r}"))


def push(
    clients: list[Client],
    path: str,
    target: str,
    work: Workload,
    source: np.ndarray,
    keys: list[bytes],
    verifier: Verifier,
) -> Run:
    """Node to node: the blocks are on this node; each request asks it to push a batch to
    `target` over `path`. Checked at the target, untimed."""
    client = clients[0]
    size = work.block_size
    for batch in work.batches():  # untimed: the prefill node holds the blocks already
        client.put([keys[i] for i in batch], [source[i * size : (i + 1) * size] for i in batch])

    transport = "grpc" if path == "grpc" else "tcp"  # node to node: never shared memory

    def request(batch: range) -> None:
        reply = client.push([keys[i] for i in batch], target, transport)
        if reply.stored != len(batch):
            raise AssertionError(f"push stored {reply.stored} of {len(batch)} blocks")

    run = timed_batches(work, request)
    with Client(target) as receiver:
        for i in filter(verifier.wants, range(work.blocks)):
            verifier.check(i, receiver.get([keys[i]])[0])
        receiver.delete(keys)
    return run


def lookup(
    address: str,
    tokens: np.ndarray,
    block_size: int,
    salt: bytes,
    server_side: bool,
    min_seconds: float,
) -> Run:
    """Prefix lookups of one prompt, repeated for at least `min_seconds`.

    Client side: the router hashes the tokens and sends keys. Server side: it
    sends the token ids and the node hashes them.
    """
    latencies: list[float] = []
    with Client(address) as client:
        start = time.perf_counter()
        while time.perf_counter() - start < min_seconds or len(latencies) < 20:
            t = time.perf_counter()
            if server_side:
                found = client.lookup_tokens(tokens, block_size, salt)
            else:
                found = client.lookup(block_keys(tokens, block_size, salt))
            latencies.append(time.perf_counter() - t)
            if found != len(tokens) // block_size:
                raise AssertionError(f"lookup found {found} of {len(tokens) // block_size} blocks")
        return Run(0, time.perf_counter() - start, latencies)


def _transport(path: str) -> str:
    """A lease is a way of reading over shared memory (puts on that path use shm);
    `nixl_staged` is NIXL from memory the client did not register."""
    return {"lease": "shm", "nixl_staged": "nixl"}.get(path, path)


def in_processes(
    address: str,
    path: str,
    work: Workload,
    keys: list[bytes],
    seed: int,
    procs: int,
    streams: int,
    verify_stride: int,
) -> tuple[Run, Run]:
    """Put, then get, with the batches shared among `procs` client processes (each with
    `streams` clients); each phase is timed from its first start to its last finish."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(
            target=_client_process,
            args=(
                n,
                address,
                path,
                work,
                keys,
                seed,
                procs,
                streams,
                verify_stride,
                start,
                results,
            ),
        )
        for n in range(procs)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=900) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    errors = [r for r in reports if isinstance(r, str)]
    if errors:
        raise AssertionError(errors[0])
    runs = []
    for phase in ("put", "get"):
        begin = min(r[phase][0] for r in reports)
        end = max(r[phase][1] for r in reports)
        latencies = [t for r in reports for t in r[phase][2]]
        runs.append(Run(work.blocks * work.block_size, end - begin, latencies))
    return runs[0], runs[1]


def _client_process(n, address, path, work, keys, seed, procs, streams, stride, start, results):
    try:
        from kvstore.bench.measure import source_bytes

        source = source_bytes(work.total, seed)
        share = replace(work, part=(n, procs))
        verifier = Verifier(source, work.block_size, stride)
        own = clients(address, path, streams, work.chunk, source)
        buffers = get_buffers(own, path, work.batch * work.block_size)
        report = {}
        for phase in ("put", "get"):
            start.wait()
            begin = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
            if phase == "put":
                run = kvstore_put(own, share, source, keys)
            else:
                run = kvstore_get(own, path, share, keys, verifier, buffers)
            report[phase] = (begin, time.monotonic(), run.latencies)
        for client in own:
            client.close()
        results.put(report)
    except Exception as exc:  # reported to the parent, which fails loudly
        results.put(f"client process {n} failed: {exc!r}")
