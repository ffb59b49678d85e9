"""kvstore: KV-cache transfer and tiered storage for disaggregated LLM inference.

The core (this package) is plain Python + numpy: keys, block metadata, codecs, tiers
and the store that orchestrates them. `kvstore.server` and `kvstore.client` put it
on the wire.
"""

from kvstore.errors import (
    Busy,
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    LeaseExpired,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)

__version__ = "0.1.0"
__all__ = [
    "Busy",
    "CorruptBlock",
    "InvalidArgument",
    "KVStoreError",
    "LeaseExpired",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
    "__version__",
]
