"""Ceilings: what the socket, memory, disk and a bare gRPC stream do with the same bytes,
in the same process layout as kvstore (a server process, the client in the benchmark).

Run as `python -m kvstore.bench.ceilings tcp|grpc|nixl` to serve the far side of a ceiling.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from kvstore import fabric
from kvstore.bench.measure import Run, Workload, timed_batches
from kvstore.bench.procs import Processes
from kvstore.proto.frames import encode_data

_HEADER = struct.Struct("!cQQ")  # op (P: client sends, G: server sends), bytes, block size
_NIXL_HEADER = struct.Struct("!cQQQ")  # op (P: node READs, G: node WRITEs), bytes, block, where
_LENGTH = struct.Struct("!Q")
_agents = itertools.count()
_RAW = {"request_deserializer": None, "response_serializer": None}
_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]


def memcpy(work: Workload, source: np.ndarray) -> Run:
    """Copy every block into one reused destination buffer."""
    dest = np.empty(work.block_size, np.uint8)
    size = work.block_size

    def copy(batch: range) -> None:
        for i in batch:
            np.copyto(dest, source[i * size : (i + 1) * size])

    return timed_batches(work, copy)


def start_server(processes: Processes, kind: str) -> int:
    """Start the far side of the `tcp` or `grpc` ceiling; return its port."""
    proc = processes.spawn(
        [sys.executable, "-m", "kvstore.bench.ceilings", kind], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None  # piped
    return int(proc.stdout.readline())


def raw_tcp(port: int, work: Workload, source: np.ndarray, direction: str) -> Run:
    """Blocks over one loopback TCP connection to another process, `recv_into` reused memory."""
    size = work.block_size
    dest = memoryview(bytearray(size))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def request(batch: range) -> None:
            nbytes = len(batch) * size
            sock.sendall(_HEADER.pack(b"P" if direction == "put" else b"G", nbytes, size))
            if direction == "put":
                for i in batch:
                    sock.sendall(source[i * size : (i + 1) * size].data)
                _recv_exact(sock, memoryview(bytearray(1)))
            else:
                for _ in batch:
                    _recv_exact(sock, dest)

        return timed_batches(work, request)


def raw_nixl(port: int, work: Workload, source: np.ndarray, direction: str) -> Run:
    """Two bare NIXL agents, moving blocks as the nixl path does: the far process (the
    node) WRITEs its registered buffer into this one's registered memory (get) or READs
    this one's into it (put), one descriptor per block and one transfer per batch, built
    per transfer; neither agent runs a progress thread, and this side makes progress
    while it waits for the node's answer on the socket (as the nixl path's client does)."""
    agent = fabric.Agent(f"kvstore-bench-{os.getpid()}-{next(_agents)}")
    size = work.block_size
    memory = source if direction == "put" else np.empty(work.batch * size, np.uint8)
    base = fabric.address(memory).addr
    agent.register(fabric.address(memory))
    answer = memoryview(bytearray(1))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        metadata = agent.metadata()
        sock.sendall(_LENGTH.pack(len(metadata)) + metadata)
        poller = select.poll()
        poller.register(sock, select.POLLIN)

        def request(batch: range) -> None:
            at = base + batch.start * size if direction == "put" else base
            op = b"P" if direction == "put" else b"G"
            sock.sendall(_NIXL_HEADER.pack(op, len(batch) * size, size, at))
            while not poller.poll(0):
                agent.progress()
            _recv_exact(sock, answer)

        request(next(work.batches()))  # untimed: the agents' wire-up, as in a warm-up
        return timed_batches(work, request)


def grpc_bare(port: int, work: Workload, direction: str) -> Run:
    """The same frames through gRPC with an empty servicer: no per-message work at all."""
    frame = encode_data([bytes(work.chunk)])
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_OPTIONS) as channel:
        put = channel.stream_unary("/bare/Put")
        get = channel.unary_stream("/bare/Get")

        def request(batch: range) -> None:
            nbytes = len(batch) * work.block_size
            frames = -(-nbytes // work.chunk)
            if direction == "put":
                put(iter([frame] * frames))
            else:
                for _ in get(struct.pack("!QQ", nbytes, work.chunk)):
                    pass

        return timed_batches(work, request)


def file_io(directory: Path, work: Workload, source: np.ndarray, direction: str) -> Run:
    """Sequential block writes with an fsync per batch, or reads of them with a cold cache."""
    path = directory / "ceiling.bin"
    size = work.block_size
    with open(path, "wb") as f:  # written either way: a read needs something to read
        write = timed_batches(work, lambda batch: _write_batch(f, source, batch, size))
    if direction == "put":
        return write
    dest = memoryview(bytearray(size))
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read from disk, not cache
        return timed_batches(work, lambda batch: [f.readinto(dest) for _ in batch])


def _write_batch(f, source: np.ndarray, batch: range, size: int) -> None:
    for i in batch:
        f.write(source[i * size : (i + 1) * size])
    f.flush()
    os.fsync(f.fileno())


def _recv_exact(sock: socket.socket, into: memoryview) -> None:
    got = 0
    while got < len(into):
        n = sock.recv_into(into[got:])
        if n == 0:
            raise ConnectionError("ceiling server closed the connection")
        got += n


def _serve_tcp() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        header = memoryview(bytearray(_HEADER.size))
        buffers: dict[int, memoryview] = {}
        while True:  # one connection at a time, one per measurement
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while True:
                    try:
                        _recv_exact(conn, header)
                    except ConnectionError:
                        break
                    op, nbytes, size = _HEADER.unpack(header)
                    buf = buffers.setdefault(size, memoryview(bytearray(size)))
                    for _ in range(nbytes // size):
                        _recv_exact(conn, buf) if op == b"P" else conn.sendall(buf)
                    if op == b"P":
                        conn.sendall(b"k")


def _serve_nixl() -> None:
    agent = fabric.Agent(f"kvstore-bench-node-{os.getpid()}")
    buffers = [np.empty(0, np.uint8)]  # registered; each kept while the agent lives
    header = memoryview(bytearray(_NIXL_HEADER.size))
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        while True:  # one connection (one client agent) per measurement
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                length = memoryview(bytearray(_LENGTH.size))
                _recv_exact(conn, length)
                metadata = memoryview(bytearray(_LENGTH.unpack(length)[0]))
                _recv_exact(conn, metadata)
                peer = agent.add_peer(bytes(metadata))
                while True:
                    try:
                        _recv_exact(conn, header)
                    except ConnectionError:
                        break
                    op, nbytes, size, at = _NIXL_HEADER.unpack(header)
                    if buffers[-1].nbytes < nbytes:  # registered in the warm-up
                        buffers.append(np.ones(nbytes, np.uint8))  # not the zero page
                        agent.register(fabric.address(buffers[-1]))
                    base = fabric.address(buffers[-1]).addr
                    local = [(base + offset, size) for offset in range(0, nbytes, size)]
                    remote = [(at + offset, size) for offset in range(0, nbytes, size)]
                    verb = "READ" if op == b"P" else "WRITE"
                    deadline = time.monotonic() + 60
                    agent.move(verb, local, remote, fabric.Region(0, 0), peer, deadline)
                    conn.sendall(b"k")
                agent.remove_peer(peer)


def _serve_grpc() -> None:
    frames: dict[int, bytes] = {}

    def put(requests, context) -> bytes:
        return sum(len(r) for r in requests).to_bytes(8, "little")

    def get(request: bytes, context):
        nbytes, chunk = struct.unpack("!QQ", request)
        frame = frames.setdefault(chunk, encode_data([bytes(chunk)]))
        for _ in range(-(-nbytes // chunk)):
            yield frame

    server = grpc.server(futures.ThreadPoolExecutor(4), options=_OPTIONS)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bare",
                {
                    "Put": grpc.stream_unary_rpc_method_handler(put, **_RAW),
                    "Get": grpc.unary_stream_rpc_method_handler(get, **_RAW),
                    "Ping": grpc.unary_unary_rpc_method_handler(lambda r, c: b"", **_RAW),
                },
            )
        ]
    )
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    {"tcp": _serve_tcp, "grpc": _serve_grpc, "nixl": _serve_nixl}[sys.argv[1]]()
