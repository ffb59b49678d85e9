"""Chained, salted block keys: one 16-byte digest per full token block.

    key[i] = blake2b(key[i-1] || salt || token ids of block i as little-endian uint32)

with key[-1] = 16 zero bytes and a 16-byte digest. Each key stands for the whole
prefix up to and including its block, so "longest cached prefix" is "first
missing key". A keyed cryptographic hash (not a fast non-cryptographic one) keeps
a crafted prompt from colliding into another namespace's cache; the salt
separates models, dtypes, layouts and tenants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.limits import MAX_BLOCKS

KEY_BYTES = 16
ROOT = bytes(KEY_BYTES)

BlockKey = bytes


def block_keys(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int = 256,
    salt: bytes = b"",
    parent: BlockKey = ROOT,
) -> list[BlockKey]:
    """Keys of every full block of `token_ids`; a trailing partial block has none.

    `parent` continues a chain: pass the last key of an earlier prefix to hash
    only the new tokens of a growing conversation.
    """
    if block_size < 1:
        raise InvalidArgument("block_size", f"must be >= 1, got {block_size}")
    check_key(parent, "parent")
    tokens = check_tokens(token_ids)
    raw = memoryview(tokens.astype("<u4", copy=False).tobytes())
    step = block_size * 4
    keys: list[BlockKey] = []
    prev = parent
    for start in range(0, len(tokens) // block_size * step, step):
        digest = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        digest.update(salt)
        digest.update(raw[start : start + step])
        prev = digest.digest()
        keys.append(prev)
    return keys


def namespace_salt(**parts: object) -> bytes:
    """A salt naming what KV belongs to: `namespace_salt(model=..., dtype=..., layout=...)`.

    Order-independent and unambiguous: blocks of different models, dtypes,
    layouts or tenants never share a key.
    """
    text = "\x1f".join(f"{name}={parts[name]}" for name in sorted(parts))
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def name_key(name: str, salt: bytes) -> BlockKey:
    """The key of a block an engine names itself (a page hash with its rank, an object key),
    kept apart by `salt` (`namespace_salt`) as chained keys are."""
    return hashlib.blake2b(name.encode(), digest_size=KEY_BYTES, key=salt).digest()


def check_tokens(
    token_ids: Sequence[int] | np.ndarray, field: str = "token_ids", limit: int | None = None
) -> np.ndarray:
    """Token ids as a one-dimensional integer array of uint32 values (at most `limit` of
    them), or InvalidArgument naming `field`."""
    try:
        tokens = np.asarray(token_ids)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(field, f"not a sequence of integers: {exc}") from None
    if tokens.ndim != 1:
        raise InvalidArgument(field, f"must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise InvalidArgument(field, f"must be integers, got {tokens.dtype}")
    if limit is not None and len(tokens) > limit:
        raise InvalidArgument(field, f"{len(tokens)} tokens: at most {limit} per request")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF):
        raise InvalidArgument(field, "must fit in uint32 (0 .. 4294967295)")
    return tokens


def check_key(key: object, field: str = "key") -> BlockKey:
    """Return `key` as bytes if it is a 16-byte key, else raise naming `field`."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidArgument(field, f"must be bytes, got {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise InvalidArgument(field, f"must be {KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)


def check_keys(
    keys: Sequence[object], field: str = "keys", *, unique: bool = False, limit: int = MAX_BLOCKS
) -> list[BlockKey]:
    """Validate a non-empty batch of at most `limit` keys; `unique` rejects repeats."""
    if not keys:
        raise InvalidArgument(field, "must not be empty")
    if len(keys) > limit:
        raise InvalidArgument(field, f"{len(keys)} keys: at most {limit} per request")
    checked = [check_key(k, f"{field}[{i}]") for i, k in enumerate(keys)]
    if unique and len(set(checked)) != len(checked):
        seen: dict[bytes, int] = {}
        for i, k in enumerate(checked):
            if k in seen:
                raise InvalidArgument(f"{field}[{i}]", f"repeats {field}[{seen[k]}] ({k.hex()})")
            seen[k] = i
    return checked
