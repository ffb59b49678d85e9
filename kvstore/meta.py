"""What a node stores beside each payload."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from kvstore.codecs import NAMES as CODECS
from kvstore.errors import CorruptBlock, InvalidArgument
from kvstore.limits import MAX_NAME, MAX_RANK


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """Metadata of one block. Nodes store and return it; only clients interpret it.

    `size` is the payload length as stored and sent; `raw_size` the length before
    encoding (0: same as size); `checksum` an xxh3-64 of the payload (0: none).
    """

    size: int
    dtype: str = ""
    shape: tuple[int, ...] = ()
    layout: str = ""
    codec: str = ""
    raw_size: int = 0
    checksum: int = 0

    def validate(self, field: str, max_size: int) -> None:
        """Raise InvalidArgument naming `field.<attr>` for anything a node must refuse."""
        if not 1 <= self.size <= max_size:
            raise InvalidArgument(f"{field}.size", f"must be 1..{max_size} bytes, got {self.size}")
        if self.codec not in CODECS:
            raise InvalidArgument(f"{field}.codec", f"unknown codec {self.codec!r}")
        for name in ("dtype", "layout"):
            if len(getattr(self, name)) > MAX_NAME:
                raise InvalidArgument(f"{field}.{name}", f"longer than {MAX_NAME} characters")
        if len(self.shape) > MAX_RANK:
            raise InvalidArgument(
                f"{field}.shape", f"{len(self.shape)} dimensions: at most {MAX_RANK}"
            )


def check_stored(payload: memoryview, key: bytes, meta: BlockMeta) -> None:
    """CorruptBlock unless a stored block's `payload` matches its checksum (a block put
    with checksums off has none, and is taken as it is)."""
    if meta.checksum and xxhash.xxh3_64_intdigest(payload) != meta.checksum:
        raise CorruptBlock(f"block {key.hex()} failed its checksum")
