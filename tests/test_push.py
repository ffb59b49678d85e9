"""Node to node: pushes go over the target's data plane, only to allowed targets, within
the caller's deadline, and never tie up the pushing node."""

import os
import socket
import threading

import numpy as np
import pytest

from conftest import fake_node, running_daemon
from kvstore.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb

MiB = 1 << 20


def keys_for(salt: bytes, n: int) -> list[bytes]:
    return block_keys(np.arange(n * 16), 16, salt)


def test_push_moves_blocks_node_to_node(daemon, salt, rng) -> None:
    payloads = [rng.integers(0, 256, n, np.uint8) for n in (MiB, 3 * MiB + 5, 17)]
    keys = keys_for(salt, 4)
    with running_daemon("--host-capacity", "64MiB") as decode_node, daemon.client() as prefill:
        prefill.put(keys[:3], payloads)
        reply = prefill.push(keys, decode_node.address)
        assert (reply.found, reply.stored, reply.existed) == (3, 3, 0)
        assert prefill.push(keys, decode_node.address).existed == 3
        with decode_node.client() as decode:
            got = decode.get(keys)
            assert len(got) == 3 and all(
                np.array_equal(a, b) for a, b in zip(got, payloads, strict=True)
            )
        assert prefill.push(keys[3:], decode_node.address).found == 0
        with pytest.raises(Unavailable, match=r"push to 127\.0\.0\.1:1 failed"):
            prefill.push(keys[:1], "127.0.0.1:1")


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_push_takes_the_path_asked_for(daemon, salt, transport: str) -> None:
    keys = keys_for(salt, 2)
    with running_daemon("--host-capacity", "8MiB") as target, daemon.client() as source:
        source.put(keys, [b"one", b"two"])
        assert source.push(keys, target.address, transport).stored == 2
        with target.client() as receiver:
            assert receiver.stats().transfers == {f"put/{transport}": 1}
        with pytest.raises(InvalidArgument, match="unknown transport 'shm'"):
            source.push(keys, target.address, "shm")  # a node never writes another's memory


def test_a_push_to_itself_is_refused_at_once(daemon, salt) -> None:
    keys = keys_for(salt, 1)
    with daemon.client() as client:
        client.put(keys, [b"mine"])
        errors: list[Exception] = []

        def push() -> None:
            try:
                client.push(keys, daemon.address)
            except Exception as exc:
                errors.append(exc)

        pushes = [threading.Thread(target=push) for _ in range(40)]
        for thread in pushes:
            thread.start()
        for thread in pushes:
            thread.join()
        assert len(errors) == 40
        assert all(isinstance(e, (InvalidArgument, ResourceExhausted)) for e in errors)
        assert any("is this node" in str(e) for e in errors)
        assert client.lookup(keys) == 1  # and the node still serves


def test_targets_outside_push_allow_are_refused_before_any_byte() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as bystander,
        running_daemon("--host-capacity", "4MiB", "--push-allow", "10.0.0.0/8") as node,
        node.client() as client,
    ):
        keys = keys_for(b"forgery", 1)
        client.put(keys, [b"x"])
        target = f"127.0.0.1:{bystander.getsockname()[1]}"
        with pytest.raises(
            PermissionDenied, match=r"127\.0\.0\.1 is neither a node of this cluster nor in"
        ):
            client.push(keys, target)
        bystander.setblocking(False)
        with pytest.raises(BlockingIOError):  # not even a connection was attempted
            bystander.accept()


def test_a_target_cannot_steer_a_push_elsewhere_or_into_memory(daemon, salt, tmp_path) -> None:
    """A fake node names a data plane outside --push-allow, and offers a file's descriptor
    as shared memory: it cannot prove itself a node of the cluster, so it is sent nothing."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1024)
    fd = os.open(victim, os.O_RDWR)
    keys = keys_for(salt, 1)
    info = pb.NodeInfo(
        node_id=os.urandom(16).hex(), data_address="192.0.2.1:9", ticket=os.urandom(16)
    )
    try:
        with fake_node(info, unix_fd=fd) as fake, daemon.client() as client:
            client.put(keys, [b"payload"])
            with pytest.raises(PermissionDenied, match="did not prove it is a node"):
                client.push(keys, fake)
            with pytest.raises(PermissionDenied) as failed:
                client.push(keys, fake, "grpc")  # the fake cannot take a Put either
            assert "precious" not in str(failed.value) and str(victim) not in str(failed.value)
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"precious" * 1024


def test_pushes_to_a_silent_target_keep_their_deadline_and_stats_answer(daemon, salt) -> None:
    """40 pushes to an address that accepts connections and never answers: each ends by
    its caller's deadline (or is refused at once), and the node answers Stats meanwhile."""
    keys = keys_for(salt, 1)
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # never accepts
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        with daemon.client() as setup:
            setup.put(keys, [b"x" * 1000])
        errors: list[Exception] = []

        def push() -> None:
            with daemon.client(timeout=3) as client:
                try:
                    client.push(keys, target)
                except Exception as exc:
                    errors.append(exc)

        pushes = [threading.Thread(target=push) for _ in range(40)]
        for thread in pushes:
            thread.start()
        with daemon.client(timeout=10) as watcher:
            assert watcher.stats().tiers[0].name == "host"  # while pushes are in flight
            assert watcher.lookup(keys) == 1
        for thread in pushes:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in pushes)
        assert len(errors) == 40
        assert all(isinstance(e, (Unavailable, ResourceExhausted)) for e in errors)
