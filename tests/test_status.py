"""Statuses on the wire, and which refusals are tried again: every kvstore exception
crosses to the caller as itself; a busy refusal is retried by the client alone, as many
times as it is configured to, and any other refusal (a quota, a batch too large) is final."""

from __future__ import annotations

import numpy as np
import pytest
from test_metrics import scrape

from conftest import raw_channel, read_answer, running_daemon, send_request
from kvstore import errors
from kvstore.errors import Busy, InvalidArgument, KVStoreError, ResourceExhausted
from kvstore.keys import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto.channel import PUT, READY
from kvstore.proto.status import error_of, status_of

MiB = 1 << 20
AUTH = """secret = "the-node-side-secret-of-the-status-tests-0123456789"

[[tenant]]
name = "small"
token = "small-token-0123456789"
quota = "1MiB"

[[tenant]]
name = "big"
token = "big-token-0123456789"
"""


def attempts(d, method: str, code: str) -> float:
    """Calls of `method` the node answered with `code`, each attempt counted."""
    labels = (("code", code), ("method", method))
    return scrape(d).get(("kvstore_rpc_duration_seconds_count", labels), 0.0)


@pytest.mark.parametrize(
    "cls",
    [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, KVStoreError)],
)
def test_every_exception_comes_back_as_itself(cls: type[KVStoreError]) -> None:
    sent = InvalidArgument("blocks[3].key", "too short") if cls is InvalidArgument else cls("x")
    code, busy = status_of(sent)
    back = error_of(code, str(sent), busy)
    assert type(back) is cls
    assert busy == (cls is Busy)
    if cls is InvalidArgument:
        assert (back.field, back.reason) == ("blocks[3].key", "too short")


def test_a_refusal_that_is_not_busy_reaches_the_caller_after_one_attempt(tmp_path) -> None:
    auth = tmp_path / "tenants.toml"
    auth.write_text(AUTH)
    keys = block_keys(np.arange(3 * 16), 16, b"final")
    block = np.full(MiB, 5, np.uint8)
    flags = ("--host-capacity", "64MiB", "--max-connection-bytes", "2MiB", "--auth-file")
    with (
        running_daemon(*flags, str(auth), "--metrics-address", "127.0.0.1:0") as d,
        d.client(token="small-token-0123456789", transport="grpc", timeout=30) as small,
        d.client(token="big-token-0123456789", transport="grpc", timeout=30) as big,
    ):
        with pytest.raises(ResourceExhausted, match="quota") as quota:
            small.put(keys[:2], [block[: MiB // 2 + 1]] * 2)  # past its 1 MiB
        assert not isinstance(quota.value, Busy)
        assert attempts(d, "Put", "RESOURCE_EXHAUSTED") == 1
        for i in range(3):
            big.put(keys[i : i + 1], [block])
        with pytest.raises(ResourceExhausted, match="split the batch") as too_large:
            big.get(keys)  # 3 MiB on one connection
        assert not isinstance(too_large.value, Busy)
        assert attempts(d, "Get", "RESOURCE_EXHAUSTED") == 1
        assert len(big.get(keys[:2])) == 2  # within the bound: served


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_a_busy_refusal_is_retried_by_the_client_alone(monkeypatch, transport: str) -> None:
    """A node that stays busy sees the client's configured retries plus one attempts,
    whatever the path: gRPC's own retries would multiply them."""
    monkeypatch.setattr("kvstore.client.client.BUSY_BACKOFF", (0.01, 0.02, 0.04))
    keys = block_keys(np.arange(2 * 16), 16, f"busy/{transport}".encode())
    block = np.full(MiB, 9, np.uint8)
    flags = ("--host-capacity", "64MiB", "--max-inflight-bytes", "1MiB")
    with (
        running_daemon(*flags, "--metrics-address", "127.0.0.1:0") as d,
        d.client(transport=transport, timeout=30) as c,
    ):
        c.put(keys[1:], [block])
        with raw_channel(d.address) as slow:
            send_request(slow, PUT, pb.BlockHeaders(blocks=[
                pb.BlockHeader(key=keys[0], meta=pb.BlockMeta(size=MiB))]))  # fmt: skip
            assert read_answer(slow).flags & READY  # 1 MiB in flight: the node's bound
            with pytest.raises(Busy, match="in flight"):
                c.get(keys[1:])
            assert scrape(d)["kvstore_busy_refusals_total", ()] == 4
            slow.sendall(block.tobytes())
            assert pb.PutReply.FromString(read_answer(slow).meta).stored == 1
        assert [bytes(b) for b in c.get(keys)] == [block.tobytes()] * 2  # room again
