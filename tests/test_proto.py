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


def test_service_contract_names_every_rpc() -> None:
    from kvstore.proto import kvstore_pb2

    methods = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].methods_by_name
    assert set(methods) == {"Put", "Get", "Lookup", "Delete", "Stats"}
    assert methods["Put"].client_streaming and methods["Get"].server_streaming
