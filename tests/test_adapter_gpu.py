"""The engine adapter's GPU paths: paged KV on the device, stored and loaded in place
through the node's shared arena, or through pinned staging over TCP. GPU only."""

from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no GPU here", allow_module_level=True)

from kvstore.client.engine import KVAdapter, KVSpec  # noqa: E402

BLOCK = 16


@pytest.fixture(params=["auto", "tcp"])
def adapter(daemon, request: pytest.FixtureRequest) -> Iterator[KVAdapter]:
    spec = KVSpec(f"gpu/{request.node.nodeid}", 4, 2, 64, torch.bfloat16, BLOCK)
    with daemon.client(transport=request.param) as client:
        yield KVAdapter(client, spec)


def test_paged_kv_on_the_gpu_round_trips(adapter: KVAdapter) -> None:
    spec = adapter.spec
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages = [
        torch.randn(12, 2, BLOCK, spec.kv_heads, spec.head_dim, device="cuda", generator=gen).to(
            torch.bfloat16
        )
        for _ in range(spec.layers)
    ]
    table = [7, 2, 9, 4, 0]
    tokens = np.arange(len(table) * BLOCK + 5)
    assert adapter.store_pages(tokens, pages, table).stored == len(table)
    assert adapter.store_pages(tokens, pages, table).existed == len(table)
    fresh = [torch.zeros_like(p) for p in pages]
    assert adapter.load_pages(tokens, fresh, [1, 3, 5, 8, 11]) == len(table) * BLOCK
    for before, after in zip(pages, fresh, strict=True):
        assert torch.equal(after[[1, 3, 5, 8, 11]], before[table])
        assert not after[[0, 2, 4, 6, 7, 9, 10]].any()
