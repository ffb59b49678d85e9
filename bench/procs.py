"""Processes the benchmark starts, and stops whatever happens (Ctrl-C included)."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path


def cluster_secret() -> str:
    """The file of the cluster secret every node this benchmark starts (they inherit
    KVSTORE_CLUSTER_SECRET) and every router it makes share: one per run, unless given."""
    if not os.environ.get("KVSTORE_CLUSTER_SECRET"):
        folder = tempfile.mkdtemp(prefix="kvstore-bench-")
        atexit.register(shutil.rmtree, folder, True)
        path = Path(folder) / "cluster.secret"
        path.write_text(os.urandom(24).hex() + "\n")
        path.chmod(0o600)
        os.environ["KVSTORE_CLUSTER_SECRET"] = str(path)
    return os.environ["KVSTORE_CLUSTER_SECRET"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes(ExitStack):
    """Every child started here is terminated (then killed) when the stack closes."""

    def spawn(self, cmd: list[str], **kw) -> subprocess.Popen:
        cluster_secret()  # every child of one run is of one cluster
        # A Ctrl-C between the child's start and its registration here would leave it
        # running: hold it back until then. Blocking the signal would not do: the kernel
        # hands it to any thread that does not block it, and Python raises it in the
        # main thread wherever that is. A Python handler runs in the main thread, here.
        if threading.current_thread() is not threading.main_thread():
            proc = subprocess.Popen(cmd, **kw)
            self.callback(_stop, proc)
            return proc
        interrupted: list[object] = []
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        try:
            proc = subprocess.Popen(cmd, **kw)  # exec resets the handler in the child
            self.callback(_stop, proc)
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        return proc

    def daemon(self, *flags: str) -> str:
        """Start `kvstore-server` on a free port; return its address."""
        return listening(self.start_daemon(*flags))

    def start_daemon(
        self, *flags: str, module: Sequence[str] = ("kvstore.server",)
    ) -> subprocess.Popen:
        """Start `kvstore-server` (or `module`, a launcher of it) on a free port; its address
        is `listening(proc)`, so that several may start at once."""
        cmd = [sys.executable, "-m", *module, "--address", "127.0.0.1:0"]
        cmd += ["--log-level", "warning", *flags]
        return self.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def redis(self) -> str | None:
        """Start `redis-server` on a free port if it is installed; return its URL."""
        server = self.redis_server()
        return server.url if server else None

    def redis_server(self) -> RedisServer | None:
        """Start `redis-server` on a free port if it is installed (None if not)."""
        binary = shutil.which("redis-server")
        if binary is None:
            return None
        workdir = self.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-bench-redis-"))
        return RedisServer(self, binary, free_port(), workdir).start()

    def tempdir(self) -> Path:
        return Path(self.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-bench-")))


class RedisServer:
    """A redis-server that keeps nothing on disk, and the faults a chaos run gives it."""

    def __init__(self, procs: Processes, binary: str, port: int, workdir: str) -> None:
        self.procs, self.binary, self.port, self.workdir = procs, binary, port, workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        """Start (again) on the same port, empty."""
        flags = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        flags += ["no", "--dir", self.workdir, "--protected-mode", "no"]
        flags += ["--proto-max-bulk-len", "1gb", "--client-query-buffer-limit", "1gb"]
        self.process = self.procs.spawn(
            [self.binary, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for_redis(self.url)
        return self

    def restart_empty(self) -> None:
        """SIGKILL, then start again with nothing: every node record and entry is gone."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.start()

    def stall(self, seconds: float) -> threading.Timer:
        """SIGSTOP now, SIGCONT after `seconds`: connections stay open and go unanswered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        timer = threading.Timer(seconds, self.process.send_signal, (signal.SIGCONT,))
        timer.daemon = True
        timer.start()
        self.procs.callback(_resume, self.process, timer)
        return timer


def _resume(proc: subprocess.Popen, timer: threading.Timer) -> None:
    timer.cancel()
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a stopped child would not take the SIGTERM


def _wait_for_redis(url: str, timeout: float = 20.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on {url}") from None
            time.sleep(0.05)
        finally:
            client.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def listening(proc: subprocess.Popen) -> str:
    """The address of a daemon `Processes.start_daemon` started, once it serves."""
    assert proc.stdout is not None and proc.stderr is not None  # piped
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        raise RuntimeError(f"kvstore-server did not start: {line}{proc.stderr.read()}")
    return match.group(1)
