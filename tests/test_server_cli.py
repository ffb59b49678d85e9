"""The daemon as a user starts it."""

import re
import subprocess
import sys
from dataclasses import fields

from conftest import running_daemon
from kvstore.client import Client
from kvstore.config import ServerConfig
from kvstore.errors import Unavailable
from kvstore.tiers.disk import DiskTier


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def test_help_explains_every_flag() -> None:
    out = run("--help").stdout
    for f in fields(ServerConfig):
        assert f"--{f.name.replace('_', '-')}" in out
    assert "KVSTORE_" in out


def test_port_zero_prints_the_bound_port_and_serves() -> None:
    with running_daemon("--host-capacity", "8MiB") as daemon:
        port = int(daemon.address.rsplit(":", 1)[1])
        assert port > 0
        with Client(daemon.address) as client:
            assert client.stats().tiers[0].capacity == 8 << 20


def test_environment_configures_the_daemon() -> None:
    with (
        running_daemon(env={"KVSTORE_HOST_CAPACITY": "12MiB"}) as daemon,
        Client(daemon.address) as client,
    ):
        assert client.stats().tiers[0].capacity == 12 << 20


def test_bad_flag_values_are_named() -> None:
    result = run("--host-capacity", "lots")
    assert result.returncode == 2
    assert re.search(r"host_capacity \(from --host-capacity\): not a size", result.stderr)


def test_port_in_use_is_a_clear_error() -> None:
    with running_daemon("--host-capacity", "4MiB") as daemon:
        result = run("--address", daemon.address, "--host-capacity", "4MiB")
        assert result.returncode == 1
        assert "cannot listen on" in result.stderr


def test_sigterm_stops_gracefully() -> None:
    with running_daemon("--host-capacity", "4MiB") as daemon:
        address = daemon.address
    assert daemon.process.returncode == 0
    with Client(address, timeout=2) as client:
        try:
            client.stats()
            raise AssertionError("a stopped daemon answered")
        except Unavailable:
            pass


def test_a_second_daemon_on_the_same_disk_dir_exits_at_once(tmp_path) -> None:
    flags = ("--host-capacity", "4MiB", "--disk-dir", str(tmp_path), "--disk-capacity", "64MiB")
    with running_daemon(*flags) as first, Client(first.address, transport="tcp") as client:
        second = run("--address", "127.0.0.1:0", *flags)
        assert second.returncode == 1
        assert f"disk dir {tmp_path} is in use by another kvstore-server" in second.stderr
        assert list(tmp_path.glob("seg-*.kvs")) == [tmp_path / "seg-00000001.kvs"]
        keys = [bytes([i]) * 16 for i in range(3)]
        client.put(keys, [b"x" * 100] * 3)
        assert client.lookup(keys) == 3  # the first daemon never noticed


def test_a_daemon_with_a_disk_tier_that_cannot_bind_exits_at_once(tmp_path) -> None:
    with running_daemon("--host-capacity", "4MiB") as other:
        result = run(
            "--address", other.address, "--host-capacity", "4MiB", "--disk-dir", str(tmp_path)
        )  # `run` fails the test after 60 s: a hang would show
        assert result.returncode == 1 and "cannot listen on" in result.stderr
    DiskTier(tmp_path, 1 << 20).close()  # the failed start left the directory free


def test_endpoints_without_tokens_warn_when_others_may_reach_them() -> None:
    """/metrics and the KV event sockets take no token: bound beyond loopback, the daemon
    says so at start; on loopback it says nothing."""
    exposed = ("--metrics-address", "0.0.0.0:0", "--events-address", "tcp://*:*")
    exposed += ("--events-replay", "tcp://0.0.0.0:*")
    local = ("--metrics-address", "127.0.0.1:0", "--events-address", "tcp://127.0.0.1:*")
    local += ("--events-replay", "tcp://127.0.0.1:*")
    logs = {}
    for name, flags in (("exposed", exposed), ("local", local)):
        with running_daemon("--host-capacity", "4MiB", *flags) as daemon:
            daemon.process.terminate()
            logs[name] = daemon.process.communicate(timeout=30)[1]
    assert re.search(r"WARNING .*metrics on 0\.0\.0\.0:0 take no token", logs["exposed"])
    assert re.search(
        r"WARNING .*KV events on tcp://\*:\* and tcp://0\.0\.0\.0:\* take no token", logs["exposed"]
    )
    assert "take no token" not in logs["local"]
