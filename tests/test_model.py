"""A model-based test of the store: hypothesis drives real daemons through puts (some
durable), gets (some waiting), shared-memory leases, lookups, deletes, eviction from a
small host tier, demotion to disk, graceful restarts and SIGKILLs, and checks every answer
against a plain model of what was acknowledged and the README's loss bound.

The model keeps, for each key of a small pool, whether it is present ("yes"), absent
("no") or either ("maybe"), and the versions it may hold. Every get, lease and lookup
must agree: bytes exactly those of a version the model allows, never a key never put or
deleted since, and a miss only where a loss is allowed:
- no disk tier: the host tier evicts any block it likes, and a restart loses everything;
- a disk tier: the host tier only evicts blocks with a copy on disk, so nothing goes
  while the daemon runs; SIGTERM with --persist-on-shutdown loses nothing; SIGKILL loses
  at most the blocks not durable and not yet written down (those are "maybe" after it),
  never a durable one nor one that survived an earlier restart (it was read from disk).
Deletes stay deleted, across restarts and crashes too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvstore.client import Client
from kvstore.errors import Unsupported
from kvstore.keys import block_keys

KiB = 1 << 10
N_KEYS = 24
KEYS = block_keys(np.arange(N_KEYS * 4), 4, b"test_model/v1")
HEAD = struct.Struct("<4sII")  # magic, key index, version: what a payload says it is
MAGIC = b"KVM1"
RESTART_GAP = 15  # steps between two restarts or crashes, at least: each costs 1-2.5 s
LONG_WAIT = 5.0  # seconds a get may wait for keys the model says are all present

key_lists = st.lists(st.integers(0, N_KEYS - 1), min_size=1, max_size=4, unique=True)
put_lists = st.lists(st.integers(0, N_KEYS - 1), min_size=1, max_size=6, unique=True)
delete_lists = st.lists(st.integers(0, N_KEYS - 1), min_size=1, max_size=2, unique=True)
transports = st.sampled_from(["shm", "tcp", "grpc"])


@lru_cache(maxsize=512)
def payload(index: int, version: int) -> bytes:
    """Version `version` of key `index`'s payload: 24 to 500 KiB, not page-aligned, from a
    seeded generator (no `hash()`), headed by what it is so a wrong one can be named."""
    size = 24 * KiB * (1 + (index * 7 + version * 13) % 20) + (index * 37 + version * 101) % 4000
    body = np.random.default_rng([index, version]).integers(0, 256, size - HEAD.size, np.uint8)
    return HEAD.pack(MAGIC, index, version) + body.tobytes()


@dataclass
class Key:
    """What the model knows of one key."""

    state: str = "no"  # "yes": must be present; "no": must be absent; "maybe": either
    versions: set[int] = field(default_factory=set)  # what it may hold when present
    safe: bool = False  # survives a SIGKILL: durable, persisted, or read back from disk
    from_disk: bool = False  # untouched since a restart: if present, it came from disk
    history: list[str] = field(default_factory=list)

    def note(self, event: str) -> None:
        self.history = [*self.history[-7:], event]


class Node:
    """A `kvstore-server` subprocess on a fixed data directory, stopped and started again."""

    def __init__(self, flags: list[str], log: Path) -> None:
        self.flags = flags
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.clients: dict[str, Client] = {}

    def start(self) -> None:
        cmd = [sys.executable, "-m", "kvstore.server", "--address", "127.0.0.1:0", *self.flags]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()  # printed once it serves
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"daemon did not start: {line!r}\n{self.log_tail()}")
        self.address = match.group(1)

    def client(self, transport: str) -> Client:
        if transport not in self.clients:
            self.clients[transport] = Client(self.address, transport=transport, timeout=30)
        return self.clients[transport]

    def stop(self, sig: signal.Signals) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=60)
        finally:
            proc.stdout.close()
        expected = 0 if sig == signal.SIGTERM else -sig
        assert code == expected, f"daemon exited {code} on {sig.name}\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "daemon log (tail):\n" + "\n".join(text.splitlines()[-lines:])


def logged(step: Callable[..., None]) -> Callable[..., None]:
    """A rule whose failures carry the tail of the daemon's log."""

    @wraps(step)
    def run(self: StoreModel, **kw: object) -> None:
        try:
            step(self, **kw)
        except Exception as exc:
            exc.add_note(self.node.log_tail())
            raise

    return run


class StoreModel(RuleBasedStateMachine):
    """The rules and the model; subclasses say which daemon (with a disk tier or not)."""

    disk = False

    def flags(self, directory: Path, host: str) -> list[str]:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-model-"))
        self.node = Node([], self.dir / "daemon.log")
        self.keys = [Key() for _ in range(N_KEYS)]
        self.version = 0
        self.since_restart = 0

    def teardown(self) -> None:
        try:
            self.node.stop(signal.SIGTERM)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model's checks ------------------------------------------------------------

    def why(self, index: int) -> str:
        k = self.keys[index]
        return (
            f"key {index}: model {k.state} versions {sorted(k.versions)} safe={k.safe}; "
            f"history {k.history}"
        )

    def seen(self, index: int, data: bytes | None, how: str) -> None:
        """Check one observation of key `index` (its bytes, or None for a miss) against the
        model, then narrow the model to it."""
        k = self.keys[index]
        if data is None:
            assert k.state != "yes", f"{how}: acknowledged block lost; {self.why(index)}"
            k.state, k.versions, k.safe, k.from_disk = "no", set(), False, False
            return
        assert len(data) >= HEAD.size, f"{how}: {len(data)} bytes served; {self.why(index)}"
        magic, owner, version = HEAD.unpack_from(data)
        assert magic == MAGIC, f"{how}: bytes of no payload served; {self.why(index)}"
        assert owner == index, f"{how}: key {owner}'s bytes served; {self.why(index)}"
        assert k.state != "no", (
            f"{how}: version {version} served for a key absent (never put, deleted or "
            f"already seen missing); {self.why(index)}"
        )
        assert version in k.versions, (
            f"{how}: version {version} served, not one acknowledged; {self.why(index)}"
        )
        want = payload(index, version)
        if data != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b),
                min(len(data), len(want)),
            )
            raise AssertionError(
                f"{how}: version {version} corrupt: {len(data)} bytes (want {len(want)}), "
                f"first difference at byte {first}; {self.why(index)}"
            )
        k.versions = {version}
        if self.disk:
            k.state = "yes"
            k.safe = k.safe or k.from_disk
        k.from_disk = False

    def prefix(self, indexes: list[int], got: list[bytes], how: str, *, short: bool) -> None:
        """A prefix answer: each block got, then (unless the node said it stopped `short` of
        a stored block) a miss for the next key."""
        assert len(got) <= len(indexes), f"{how}: {len(got)} blocks for {len(indexes)} keys"
        for index, data in zip(indexes, got, strict=False):
            self.seen(index, data, how)
        if len(got) < len(indexes) and not short:
            self.seen(indexes[len(got)], None, how)

    def wait_for(self, indexes: list[int], wait: str) -> float | None:
        """A wait: long only when every key must be present (a get waits for each missing
        key in turn), short otherwise."""
        if wait == "none":
            return None
        if wait == "long" and all(self.keys[i].state == "yes" for i in indexes):
            return LONG_WAIT
        return 0.1

    def sweep(self, when: str) -> None:
        """Every other key seen at once (the rest are left for the rules to find)."""
        client = self.node.client("tcp")
        for i in range(0, N_KEYS, 2):
            self.prefix([i], [a.tobytes() for a in client.get([KEYS[i]])], when, short=False)

    def step(self) -> None:
        self.since_restart += 1

    # -- rules ---------------------------------------------------------------------------

    @initialize(host=st.sampled_from(["4MiB", "16MiB"]))
    @logged
    def fill(self, host: str) -> None:
        """Start the daemon and put every key once. 4 MiB of DRAM: puts evict from the
        start (and, over a disk tier, write everything down under pressure). 16 MiB:
        everything fits, and up to the dirty ratio stays only in DRAM, for a crash to lose."""
        self.node.flags = self.flags(self.dir / "data", host)
        self.node.start()
        for start in range(0, N_KEYS, 4):
            self.do_put(list(range(start, start + 4)), "tcp", durable=False)

    @rule(indexes=put_lists, transport=transports)
    @logged
    def put(self, indexes: list[int], transport: str) -> None:
        self.step()
        self.do_put(indexes, transport, durable=False)

    @rule(indexes=put_lists, transport=transports)
    @logged
    def put_durable(self, indexes: list[int], transport: str) -> None:
        """Acknowledged once on disk; refused, storing nothing, without a disk tier."""
        self.step()
        if self.disk:
            self.do_put(indexes, transport, durable=True)
            return
        self.version += 1
        blocks = [np.frombuffer(payload(i, self.version), np.uint8) for i in indexes]
        try:
            self.node.client(transport).put([KEYS[i] for i in indexes], blocks, durable=True)
        except Unsupported:
            return  # what it would have stored is checked by the gets: no such version
        raise AssertionError(f"durable put of {indexes} ({transport}) without a disk tier taken")

    def do_put(self, indexes: list[int], transport: str, durable: bool) -> None:
        """A put checked against the model: a key already stored is acknowledged and kept
        (`existed`), a key absent is stored; a "maybe" may be either."""
        self.version += 1
        version = self.version
        blocks = [np.frombuffer(payload(i, version), np.uint8) for i in indexes]
        how = f"put v{version} of {indexes} ({transport}, durable={durable})"
        result = self.node.client(transport).put(
            [KEYS[i] for i in indexes], blocks, durable=durable
        )
        states = [self.keys[i].state for i in indexes]
        absent, maybe = states.count("no"), states.count("maybe")
        assert result.stored + result.existed == len(indexes), f"{how}: {result}"
        assert absent <= result.stored <= absent + maybe, (
            f"{how}: {result}, with {absent} keys absent and {maybe} maybe; "
            + "; ".join(self.why(i) for i in indexes)
        )
        all_stored = result.stored == absent + maybe
        all_existed = result.stored == absent
        mark = " durable" if durable else ""
        for i in indexes:
            k = self.keys[i]
            if k.state == "no" or (k.state == "maybe" and all_stored):
                k.versions, k.safe = {version}, durable
                k.note(f"v{version} stored{mark}")
            elif k.state == "yes" or all_existed:  # kept what it had
                k.safe = durable or k.safe or k.from_disk
                k.note(f"v{version} existed{mark}")
            else:  # a maybe: stored or existed, the counts don't say which
                k.versions.add(version)
                k.safe = durable
                k.note(f"v{version} stored or existed{mark}")
            k.state = "yes" if self.disk else "maybe"
            k.from_disk = False

    @rule(
        indexes=st.lists(st.integers(0, N_KEYS - 1), min_size=1, max_size=5, unique=True),
        transport=transports,
        wait=st.sampled_from(["none", "short", "long"]),
    )
    @logged
    def get(self, indexes: list[int], transport: str, wait: str) -> None:
        self.step()
        seconds = self.wait_for(indexes, wait)
        how = f"get {indexes} ({transport}, wait={seconds})"
        started = time.monotonic()
        got = self.node.client(transport).get([KEYS[i] for i in indexes], wait=seconds)
        took = time.monotonic() - started
        self.prefix(indexes, [a.tobytes() for a in got], how, short=False)
        if seconds == LONG_WAIT:
            assert took < LONG_WAIT / 2, f"{how}: {took:.2f} s for blocks present"

    @rule(indexes=put_lists, transport=transports)
    @logged
    def get_each(self, indexes: list[int], transport: str) -> None:
        """One get per key: every key seen, whatever precedes it."""
        self.step()
        client = self.node.client(transport)
        for i in indexes:
            got = client.get([KEYS[i]])
            self.prefix([i], [a.tobytes() for a in got], f"get [{i}] ({transport})", short=False)

    @rule(indexes=key_lists, wait=st.sampled_from(["none", "short", "long"]))
    @logged
    def lease(self, indexes: list[int], wait: str) -> None:
        """Shared memory: views into the node's arena, checked while the lease holds them."""
        self.step()
        seconds = self.wait_for(indexes, wait)
        how = f"lease {indexes} (wait={seconds})"
        with self.node.client("shm").lease([KEYS[i] for i in indexes], wait=seconds) as lease:
            got = [np.asarray(b).tobytes() for b in lease.blocks]
            short = bool(lease.truncated)
        self.prefix(indexes, got, how, short=short)

    @rule(indexes=key_lists, transport=st.sampled_from(["tcp", "grpc"]))
    @logged
    def lookup(self, indexes: list[int], transport: str) -> None:
        self.step()
        found = self.node.client(transport).lookup([KEYS[i] for i in indexes])
        how = f"lookup {indexes} ({transport}) = {found}"
        for i in indexes[:found]:
            assert self.keys[i].state != "no", f"{how}: absent key present; {self.why(i)}"
        if found < len(indexes):
            i = indexes[found]
            assert self.keys[i].state != "yes", f"{how}: acknowledged key missing; {self.why(i)}"

    @rule(indexes=delete_lists)
    @logged
    def delete(self, indexes: list[int]) -> None:
        self.step()
        self.do_delete(indexes)

    def do_delete(self, indexes: list[int]) -> None:
        deleted = self.node.client("grpc").delete([KEYS[i] for i in indexes])
        states = [self.keys[i].state for i in indexes]
        present, maybe = states.count("yes"), states.count("maybe")
        assert present <= deleted <= present + maybe, f"delete {indexes} = {deleted}; " + "; ".join(
            self.why(i) for i in indexes
        )
        for i in indexes:
            k = self.keys[i]
            k.state, k.versions, k.safe, k.from_disk = "no", set(), False, False
            k.note("deleted")

    @invariant()
    @logged
    def stats(self) -> None:
        stats = self.node.client("grpc").stats()
        host = stats.tiers[0]
        assert host.bytes <= host.capacity, f"host tier over capacity: {host}"
        for tier in stats.tiers:
            assert tier.errors == 0, f"{tier.name} tier errors: {tier}\n{self.node.log_tail()}"

    @precondition(lambda self: self.since_restart >= RESTART_GAP)
    @rule()
    @logged
    def restart(self) -> None:
        """SIGTERM: a drain, then (with a disk tier) every host block written down."""
        self.since_restart = 0
        self.node.stop(signal.SIGTERM)
        self.node.start()
        for k in self.keys:
            k.note("restart")
            if not self.disk:
                k.state, k.versions, k.safe = "no", set(), False
            elif k.state == "yes":
                k.safe = True  # --persist-on-shutdown
            elif k.state == "maybe":
                k.from_disk = True
        self.sweep("after a restart")

    @precondition(lambda self: self.since_restart >= RESTART_GAP)
    @rule(fresh=st.lists(st.integers(0, N_KEYS - 1), max_size=4, unique=True))
    @logged
    def crash(self, fresh: list[int]) -> None:
        """SIGKILL: what was only in DRAM may be gone; durable blocks may not. Right before
        it, `fresh` keys are deleted and put again: new versions, not yet on disk (or being
        written), whose old versions must not come back."""
        self.since_restart = 0
        if fresh:
            self.do_delete(fresh)
            self.do_put(fresh, "shm", durable=False)
        self.node.stop(signal.SIGKILL)
        self.node.start()
        for k in self.keys:
            k.note("crash")
            if not self.disk:
                k.state, k.versions, k.safe = "no", set(), False
            elif k.state != "no" and not k.safe:
                k.state, k.from_disk = "maybe", True
        self.sweep("after a crash")


class WithDisk(StoreModel):
    """A small host tier over a disk tier: it evicts only blocks written down."""

    disk = True

    def flags(self, directory: Path, host: str) -> list[str]:
        return [
            "--host-capacity", host, "--disk-dir", str(directory), "--disk-capacity",
            "256MiB", "--segment-size", "2MiB", "--dirty-ratio", "0.25",
            "--persist-on-shutdown", "--prefault", "false", "--reserve-timeout", "10",
        ]  # fmt: skip


class CacheOnly(StoreModel):
    """A small host tier alone: puts evict, restarts lose everything."""

    def flags(self, directory: Path, host: str) -> list[str]:
        return ["--host-capacity", host, "--prefault", "false", "--reserve-timeout", "10"]


def model_settings(examples: int, steps: int) -> settings:
    """Derandomized, bounded. No shrinking unless KVSTORE_MODEL_SHRINK is set: each step
    costs a real daemon milliseconds and each restart a second or two, so shrinking a
    failure takes many minutes; without it the failing run's steps are printed as is."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("KVSTORE_MODEL_SHRINK"):
        phases.append(Phase.shrink)
    return settings(
        derandomize=True,
        database=None,
        max_examples=examples,
        stateful_step_count=steps,
        phases=phases,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
            HealthCheck.data_too_large,
        ],
    )


TestWithDisk = WithDisk.TestCase
TestWithDisk.settings = model_settings(examples=8, steps=60)
TestCacheOnly = CacheOnly.TestCase
TestCacheOnly.settings = model_settings(examples=5, steps=50)
