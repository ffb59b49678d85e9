"""Ceilings: what the socket, memory, disk and a bare gRPC stream do with the same bytes,
in the same process layout as kvstore (a server process, the client in the benchmark).

Run as `python -m kvstore.bench.ceilings tcp|grpc` to serve the far side of a ceiling.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from kvstore.bench.measure import Run, Workload, timed_batches
from kvstore.bench.procs import Processes
from kvstore.proto.frames import encode_data

_HEADER = struct.Struct("!cQQ")  # op (P: client sends, G: server sends), bytes, block size
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
    {"tcp": _serve_tcp, "grpc": _serve_grpc}[sys.argv[1]]()
