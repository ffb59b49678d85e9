"""The NIXL path's own promises (README, "NIXL"; DATAPLANE.md, "NIXL"): the node names
every client agent and never gives out its own, nothing outside what a client registered
is read or written, malformed metadata is refused, sessions end with their clients, a
restarted node is met again, and a node without NIXL says so and serves as before. The
contract every path keeps (errors, bad input, checksums, a cut connection) is
tests/test_contract.py's, which runs on this path too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import NIXL, Daemon, running_daemon
from kvstore.client import Client
from kvstore.client.channel import Channels, Link
from kvstore.errors import InvalidArgument, ResourceExhausted, Unavailable, Unsupported
from kvstore.fabric import Agent, address
from kvstore.keys import block_keys
from kvstore.meta import BlockMeta
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import NIXL_GET, NIXL_PUT, NIXL_SESSION, REQUEST_MAGIC, encode
from kvstore.proto.convert import headers_to_proto
from kvstore.server.nixl import MAX_SESSIONS

pytestmark = NIXL
MiB = 1 << 20
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def node() -> Iterator[Daemon]:
    with running_daemon("--host-capacity", "128MiB", "--prefault", "false") as d:
        assert "with NIXL" in d.banner
        yield d


class Raw:
    """A session spoken by hand over the request channel, past every client-side check:
    what a hostile or broken client could send."""

    def __init__(self, client: Client) -> None:
        transport = client._nixl()
        self.channels: Channels = transport.channels
        self.link: Link = self.channels.checkout()
        opened = self.session(pb.NixlSession())
        self.id, self.agent_name = opened.session, opened.agent

    def session(self, message: pb.NixlSession) -> pb.NixlSessionReply:
        frame = self.channels.request(self.link, NIXL_SESSION, message.SerializeToString())
        return pb.NixlSessionReply.FromString(frame.meta)

    def register(self, agent: Agent, buffer: np.ndarray) -> None:
        region = address(buffer)
        agent.register(region)
        place = pb.NixlRegion(addr=region.addr, size=region.size)
        self.session(pb.NixlSession(session=self.id, metadata=agent.metadata(), regions=[place]))

    def request(self, op: int, message: object, agent: Agent | None = None) -> pb.GetAnswer:
        waiting = (lambda sock: _progress(agent, sock)) if agent is not None else None
        meta = message.SerializeToString()  # type: ignore[attr-defined]
        frame = self.channels.request(self.link, op, meta, waiting=waiting)
        return pb.GetAnswer.FromString(frame.meta)

    def close(self) -> None:
        self.channels.checkin(self.link, ok=False)


def _progress(agent: Agent, sock) -> None:
    import select

    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while not poller.poll(0):
        agent.progress()


@contextmanager
def raw_session(d: Daemon) -> Iterator[tuple[Client, Raw]]:
    with d.client(transport="nixl", timeout=TIMEOUT) as client:
        raw = Raw(client)
        try:
            yield client, raw
        finally:
            raw.close()


def test_the_path_round_trips_through_registered_memory_and_staging(node, salt) -> None:
    keys = block_keys(np.arange(20 * 16), 16, salt)
    rng = np.random.default_rng(7)
    payloads = [rng.integers(0, 256, MiB, dtype=np.uint8) for _ in range(16)]
    small = [rng.integers(0, 256, 1000, dtype=np.uint8) for _ in range(4)]
    with node.client(shm=False, timeout=TIMEOUT) as client:
        assert client.path == "nixl"  # auto, where shared memory is not to be had
        assert client.node_info().nixl
        registered = np.zeros(33 * MiB, np.uint8)
        client.register(registered)
        for i, payload in enumerate(payloads):
            registered[i * MiB : (i + 1) * MiB] = payload
        views = [registered[i * MiB : (i + 1) * MiB] for i in range(16)]
        assert client.put(keys[:16], views).stored == 16  # read by the node from there
        assert client.put(keys[16:], small).stored == 4  # small: over the socket
        out = registered[16 * MiB :]
        got = client.get(keys, out=out)  # written straight into registered memory
        assert all(np.array_equal(g, p) for g, p in zip(got, payloads + small, strict=True))
        assert got[0].base is not None and np.shares_memory(got[0], registered)
        got = client.get(keys)  # through staging
        assert all(np.array_equal(g, p) for g, p in zip(got, payloads + small, strict=True))
        counted = client.stats().transfers
        assert counted["put/nixl"] == 1 and counted["get/nixl"] == 2  # requests


def test_a_get_larger_than_any_staging_buffer_registers_one_on_the_way(node, salt) -> None:
    """The node waits for a session's transfers before it takes new memory of it: a get
    placing its blocks in staging registered meanwhile must not wait on itself."""
    keys = block_keys(np.arange(20 * 16), 16, salt)
    payloads = [np.full(4 * MiB, i, np.uint8) for i in range(20)]  # 80 MiB: past STAGE
    with node.client(transport="nixl", timeout=TIMEOUT) as client:
        client.put(keys, payloads)
        got = client.get(keys)
        assert all(np.array_equal(g, p) for g, p in zip(got, payloads, strict=True))


def test_get_into_unregistered_places_takes_the_socket(node, salt) -> None:
    keys = block_keys(np.arange(2 * 16), 16, salt)
    payloads = [np.full(3 * MiB, 9, np.uint8), np.full(100, 8, np.uint8)]
    with node.client(transport="nixl", timeout=TIMEOUT) as client:
        client.put(keys, payloads)
        places = [np.zeros(3 * MiB, np.uint8), np.zeros(100, np.uint8)]
        assert client.get_into(keys, lambda blocks: places, lambda i: None) == 2
        assert all(np.array_equal(p, w) for p, w in zip(places, payloads, strict=True))


def test_a_transfer_past_its_deadline_ends_its_session(tmp_path, monkeypatch) -> None:
    """A client that stops making progress (UCX over TCP needs the receiver's) holds the
    node's WRITE past its deadline: the node ends the session, removing the client's
    agent, before it unpins the blocks, so no late byte can reach memory reused since."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # this process's agents, and the daemon's
    flags = ("--host-capacity", "96MiB", "--prefault", "false", "--data-timeout", "1")
    keys = block_keys(np.arange(16 * 16), 16, b"stalled")
    with running_daemon(*flags) as d, raw_session(d) as (client, raw):
        client.put(keys, [np.ones(4 * MiB, np.uint8)] * 16)
        buffer = np.zeros(64 * MiB, np.uint8)
        raw.register(Agent(raw.agent_name), buffer)  # an agent that never makes progress
        into = pb.NixlRegion(addr=address(buffer).addr, size=buffer.nbytes)
        get = pb.NixlGet(ask=pb.GetRequest(keys=keys), session=raw.id, into=into)
        other = Raw(client)  # not the connection the session lives with
        with pytest.raises(Unavailable):  # the node gave up, and hung up
            other.request(NIXL_GET, get)
        with pytest.raises(Unavailable, match="NIXL session unknown"):
            raw.request(NIXL_GET, get)  # the session ended with the transfer
        assert len(client.get(keys)) == 16  # its blocks unpinned, and served again


def test_the_node_names_every_client_agent(node) -> None:
    buffer = np.zeros(MiB, np.uint8)
    with raw_session(node) as (_, raw), raw_session(node) as (_, other):
        assert raw.agent_name.startswith("kvstore-client-") and raw.agent_name != other.agent_name
        chosen = Agent("a-name-the-client-chose")
        with pytest.raises(InvalidArgument, match="describes agent 'a-name-the-client-chose'"):
            raw.register(chosen, buffer)
        with pytest.raises(InvalidArgument, match="describes agent"):  # another session's name
            raw.register(Agent(other.agent_name), buffer)
        raw.register(Agent(raw.agent_name), buffer)  # the name the node gave: accepted


def test_malformed_metadata_is_refused_and_the_node_keeps_serving(node, salt) -> None:
    """Random bytes, and a real agent's metadata cut short or with bytes flipped."""
    rng = np.random.default_rng(20261207)
    buffer = np.zeros(MiB, np.uint8)
    with raw_session(node) as (client, raw):
        agent = Agent(raw.agent_name)
        agent.register(address(buffer))
        real = agent.metadata()
        cases = [rng.bytes(int(n)) for n in rng.integers(0, 4096, 30)]
        cases += [real[: int(n)] for n in rng.integers(0, len(real), 30)]
        for at in rng.integers(0, len(real), 30):
            flipped = bytearray(real)
            flipped[int(at)] ^= 0xFF
            cases.append(bytes(flipped))
        place = pb.NixlRegion(addr=address(buffer).addr, size=MiB)
        refused = 0
        for metadata in cases:
            message = pb.NixlSession(session=raw.id, metadata=metadata, regions=[place])
            try:
                raw.session(message)
            except InvalidArgument as exc:
                assert exc.field == "metadata"
                refused += 1
        assert refused >= 60  # every random and cut-short case; a flip may land in padding
        keys = block_keys(np.arange(16), 16, salt)
        assert client.put(keys, [np.ones(2 * MiB, np.uint8)]).stored == 1  # still serving
        assert np.array_equal(client.get(keys)[0], np.ones(2 * MiB, np.uint8))


def test_memory_outside_what_a_client_registered_is_never_touched(node, salt) -> None:
    keys = block_keys(np.arange(4 * 16), 16, salt)
    payloads = [np.full(MiB, 0x5A, np.uint8) for _ in range(4)]
    registered = np.zeros(2 * MiB, np.uint8)
    outside = np.zeros(4 * MiB, np.uint8)  # never registered
    with raw_session(node) as (client, raw):
        client.put(keys, payloads)
        agent = Agent(raw.agent_name)
        raw.register(agent, registered)
        at = address(registered).addr
        ask = pb.GetRequest(keys=keys)
        cases = {
            "unregistered memory": pb.NixlRegion(addr=address(outside).addr, size=4 * MiB),
            "past the end": pb.NixlRegion(addr=at + MiB, size=2 * MiB),
            "before the start": pb.NixlRegion(addr=at - 4096, size=MiB),
            "GPU memory": pb.NixlRegion(addr=at, size=MiB, vram=True),
        }
        for case, into in cases.items():
            with pytest.raises(InvalidArgument, match="not within memory this session") as e:
                raw.request(NIXL_GET, pb.NixlGet(ask=ask, session=raw.id, into=into), agent)
            assert e.value.field == "into", case
        headers = pb.BlockHeaders(blocks=headers_to_proto([(keys[0], BlockMeta(MiB))]))
        put = pb.NixlPut(headers=headers, session=raw.id, addrs=[address(outside).addr])
        with pytest.raises(InvalidArgument, match="not within memory") as e:
            raw.request(NIXL_PUT, put, agent)
        assert e.value.field == "addrs[0]"
        # two phases: the places named after the answer are checked the same way
        frame = raw.channels.request(
            raw.link, NIXL_GET, pb.NixlGet(ask=ask, session=raw.id).SerializeToString()
        )
        assert len(pb.GetAnswer.FromString(frame.meta).blocks) == 4
        places = pb.NixlPlaces(addrs=[at, address(outside).addr])
        raw.channels.send(
            raw.link, [encode(REQUEST_MAGIC, NIXL_GET, 0, places.SerializeToString())]
        )
        with pytest.raises(InvalidArgument, match="not within memory") as e:
            raw.channels.answer(raw.link)
        assert e.value.field == "addrs[1]"
        # what fits is written, and nothing past it
        into = pb.NixlRegion(addr=at, size=2 * MiB - 1)
        answer = raw.request(NIXL_GET, pb.NixlGet(ask=ask, session=raw.id, into=into), agent)
        assert len(answer.blocks) == 1 and answer.truncated
        assert (registered[:MiB] == 0x5A).all() and not registered[MiB:].any()
        assert not outside.any()
        assert client.lookup(keys) == 4  # and nothing stored changed


def test_sessions_are_bounded_per_tenant_and_then_clients_take_tcp() -> None:
    flags = ("--host-capacity", "16MiB", "--prefault", "false", "--max-host-connections", "600")
    with running_daemon(*flags) as node, node.client(transport="nixl", timeout=TIMEOUT) as client:
        channels = client._nixl().channels
        links = [channels.checkout() for _ in range(MAX_SESSIONS + 1)]
        try:
            opened = 1  # the client's own
            for link in links:
                frame_meta = pb.NixlSession().SerializeToString()
                if opened < MAX_SESSIONS:
                    channels.request(link, NIXL_SESSION, frame_meta)
                    opened += 1
                    continue
                with pytest.raises(ResourceExhausted, match=f"{MAX_SESSIONS} NIXL sessions"):
                    channels.request(link, NIXL_SESSION, frame_meta)
                break
            with node.client(shm=False, timeout=TIMEOUT) as late:
                assert late.lookup([bytes(16)]) == 0 and late.path == "tcp"
                assert late.stats().fallbacks == {"nixl": 1}
            channels.checkin(links[0], ok=False)  # its session ends with its connection
            fresh = channels.checkout()
            channels.request(fresh, NIXL_SESSION, pb.NixlSession().SerializeToString())
            channels.checkin(fresh, ok=False)
        finally:
            for link in links[1:]:
                channels.checkin(link, ok=False)


CLIENT = textwrap.dedent(
    """
    import os, sys, numpy as np
    from kvstore.client import Client
    from kvstore.keys import block_keys
    keys = block_keys(np.arange(4 * 16), 16, b"dead client")
    clients = [Client(sys.argv[1], transport="nixl", timeout=10) for _ in range(int(sys.argv[2]))]
    for c in clients:
        buffer = np.zeros(8 << 20, np.uint8)
        c.register(buffer)
        c.put(keys, [np.full(1 << 20, 7, np.uint8)] * 4)
        assert len(c.get(keys, out=buffer)) == 4
    print("ready", flush=True)
    sys.stdin.read()  # until killed
    """
)


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_clients_that_died_leave_nothing_behind(tmp_path: Path) -> None:
    """100 clients (10 processes of 10) register memory, move blocks and are killed; the
    node's descriptors are as before, its threads grew by no more than its gRPC pool may,
    and all its DRAM can be written again (nothing left pinned or reserved)."""
    with running_daemon("--host-capacity", "64MiB", "--prefault", "false") as d:

        def killed_clients(count: int) -> None:
            cmd = [sys.executable, "-c", CLIENT, d.address, str(count)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()

        with d.client(transport="nixl", timeout=TIMEOUT) as probe:
            killed_clients(1)  # the node's UCX is warm
            pid = d.process.pid
            descriptors, threads = _descriptors(pid), _threads(pid)
            for _ in range(10):
                killed_clients(10)
            _until_equal(lambda: _descriptors(pid), descriptors)
            assert _threads(pid) <= threads + 4  # gRPC's pool grows on demand, to --workers
            keys = block_keys(np.arange(48 * 16), 16, b"after the dead")
            assert probe.put(keys, [np.ones(MiB, np.uint8)] * 48).stored == 48


def _until_equal(read, expected) -> None:
    """The node ends a dead client's connections as their sockets close: wait for it."""
    import time

    deadline = time.monotonic() + TIMEOUT
    while (got := read()) != expected:
        assert time.monotonic() < deadline, f"{got} != {expected}"
        time.sleep(0.05)


def test_a_restarted_node_is_met_again(tmp_path: Path, salt) -> None:
    keys = block_keys(np.arange(16), 16, salt)
    payload = np.arange(MiB, dtype=np.uint8)
    with running_daemon("--host-capacity", "64MiB", "--prefault", "false") as first:
        port = first.address.rpartition(":")[2]
        client = first.client(transport="nixl", timeout=TIMEOUT)
        registered = np.zeros(2 * MiB, np.uint8)
        client.register(registered)
        client.put(keys, [payload])
        assert client.path == "nixl"
    try:
        flags = ("--address", f"127.0.0.1:{port}", "--host-capacity", "64MiB")
        with running_daemon(*flags, "--prefault", "false"):
            assert client.get(keys) == []  # a new node: empty, met anew, no stale session
            client.put(keys, [payload])
            assert np.array_equal(client.get(keys)[0], payload)
            landed: list[int] = []  # the memory registered before is registered anew
            assert client.get_into(keys, lambda b: [registered[:MiB]], landed.append) == 1
            assert landed == [0] and np.array_equal(registered[:MiB], payload)
    finally:
        client.close()


BLOCK_NIXL = "import sys; sys.modules.update(dict.fromkeys(('nixl', 'nixl_cu12', 'nixl_cu13')))\n"


def test_without_nixl_the_node_says_why_and_serves_as_before(tmp_path: Path, salt) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_NIXL)  # as if it were not installed
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        cmd = [sys.executable, "-m", "kvstore.server", "--address", "127.0.0.1:0"]
        cmd += ["--host-capacity", "16MiB", "--prefault", "false"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **env}
        )
        try:
            banner = proc.stdout.readline()
            assert "with NIXL" not in banner
            address = re.search(r"listening on (\S+)", banner).group(1)
            assert "NIXL off: NIXL is not installed (pip install --no-deps nixl-cu12==1.5.1)" in (
                log.read_text()
            )
            keys = block_keys(np.arange(16), 16, salt)
            with Client(address, shm=False, timeout=TIMEOUT) as client:
                client.put(keys, [np.ones(MiB, np.uint8)])
                assert client.path == "tcp" and len(client.get(keys)) == 1
            with (
                Client(address, transport="nixl", timeout=TIMEOUT) as client,
                pytest.raises(Unsupported, match="the node offers no NIXL"),
            ):
                client.get(keys)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            proc.stdout.close()


def test_a_session_is_its_tenants_alone(node) -> None:
    """Another connection naming a session it did not open, with a guess or a real id,
    is served only as the tenant that opened it (here: the same open tenant), and an
    unknown id is Unavailable, never another's memory."""
    with raw_session(node) as (_, raw):
        ask = pb.GetRequest(keys=[bytes(16)])
        into = pb.NixlRegion(addr=4096, size=4096)
        with pytest.raises(Unavailable, match="NIXL session unknown"):
            raw.request(NIXL_GET, pb.NixlGet(ask=ask, session=raw.id ^ 1, into=into))
