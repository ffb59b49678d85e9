import hashlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import InvalidArgument
from kvstore.keys import ROOT, block_keys, check_keys, namespace_salt


def spec_keys(tokens: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """The key definition written out plainly, as an independent reference."""
    keys, prev = [], bytes(16)
    for i in range(len(tokens) // block_size):
        block = b"".join(
            t.to_bytes(4, "little") for t in tokens[i * block_size : (i + 1) * block_size]
        )
        prev = hashlib.blake2b(prev + salt + block, digest_size=16).digest()
        keys.append(prev)
    return keys


@pytest.mark.parametrize("block_size", [16, 256])
def test_keys_follow_the_chained_definition(block_size: int) -> None:
    tokens = list(range(1000, 1000 + block_size * 3 + 5))
    keys = block_keys(tokens, block_size, b"model-x")
    assert len(keys) == 3  # the trailing partial block has no key
    assert keys == spec_keys(tokens, block_size, b"model-x")
    assert all(len(k) == 16 for k in keys)


def test_fixed_vector_is_stable_across_machines() -> None:
    # Pinned digests: a change here means every stored cache would miss.
    keys = block_keys(list(range(32)), 16, b"salt")
    assert keys[0].hex() == spec_keys(list(range(32)), 16, b"salt")[0].hex()
    assert [k.hex() for k in keys] == [
        "8dce45d762e06539043c9b20548e5da4",
        "875fc829cc0d41e852db2219424fb068",
    ]


def test_keys_are_deterministic_across_processes() -> None:
    code = (
        "from kvstore.keys import block_keys; "
        "print(block_keys(list(range(512)), 256, b's')[1].hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == block_keys(list(range(512)), 256, b"s")[1].hex()


def test_a_key_stands_for_the_whole_prefix() -> None:
    a = block_keys(list(range(64)), 16, b"m")
    b = block_keys([7, *list(range(1, 64))], 16, b"m")  # first token differs
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_salt_separates_namespaces() -> None:
    tokens = list(range(256))
    assert block_keys(tokens, 16, b"a") != block_keys(tokens, 16, b"b")
    assert namespace_salt(model="m", dtype="f16") == namespace_salt(dtype="f16", model="m")
    assert namespace_salt(model="m", dtype="f16") != namespace_salt(model="m", dtype="bf16")


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.integers(1, 40))
def test_parent_continues_a_chain(tokens: list[int], block_size: int) -> None:
    whole = block_keys(tokens, block_size, b"s")
    cut = (len(whole) // 2) * block_size
    head = block_keys(tokens[:cut], block_size, b"s")
    tail = block_keys(tokens[cut:], block_size, b"s", parent=head[-1] if head else ROOT)
    assert head + tail == whole


def test_numpy_and_list_tokens_agree() -> None:
    tokens = np.arange(300, dtype=np.int64)
    assert block_keys(tokens, 16, b"x") == block_keys(tokens.tolist(), 16, b"x")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: block_keys([1, 2], 0), "block_size"),
        (lambda: block_keys([-1], 1), "token_ids"),
        (lambda: block_keys([2**32], 1), "token_ids"),
        (lambda: block_keys([[1]], 1), "token_ids"),
        (lambda: block_keys([1], 1, parent=b"short"), "parent"),
        (lambda: check_keys([]), "keys"),
        (lambda: check_keys([bytes(16), b"x" * 17]), "keys[1]"),
        (lambda: check_keys([bytes(16), bytes(16)], unique=True), "keys[1]"),
    ],
)
def test_bad_input_names_the_field(call, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.field == field
