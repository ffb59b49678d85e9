"""The committed generated modules must match kvstore.proto."""

from pathlib import Path

import pytest

from kvstore.proto import generate

pytest.importorskip("grpc_tools")


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    for fresh in generate.generate(tmp_path):
        committed = generate.HERE / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `python -m kvstore.proto.generate`"
        )


def test_the_daemon_serves_every_rpc_of_the_contract() -> None:
    from kvstore.proto import kvstore_pb2
    from kvstore.server.servicer import KVStoreServicer

    methods = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].methods_by_name
    assert {"Put", "Get", "Lookup", "Delete", "Stats"} <= set(methods)
    assert all(callable(getattr(KVStoreServicer, name, None)) for name in methods)
    assert methods["Put"].client_streaming and methods["Get"].server_streaming
