"""GPU memory over NIXL, through the client's registered host staging. On one host, UCX
moves GPU memory between processes only by software emulation over TCP (it has no
transport between one process's host memory and another's GPU memory): 0.5-0.7 GB/s on an
H100 machine, against 2.1-3.2 GB/s through host staging (bench/results/nixl_gpu_h100.json).
So a block leaves or reaches GPU memory with one copy here, and is hashed or checked here
as any host block is. torch is imported only by callers that hand in CUDA tensors."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore.client.pipeline import Block
from kvstore.meta import check_stored

# False: UCX moves GPU memory itself (where the fabric reads and writes it, GPUDirect RDMA),
# the node checking blocks bound for it before they leave
STAGED = True


def is_gpu(buffer: object) -> bool:
    """Whether `buffer` is GPU memory that goes through staging."""
    return STAGED and bool(getattr(buffer, "is_cuda", False))


def slices(staging: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Back to back in `staging`, one slice per size."""
    ends = list(itertools.accumulate(sizes, initial=0))
    return [staging[a:b] for a, b in itertools.pairwise(ends)]


def download(tensors: Sequence[Any], staging: np.ndarray) -> list[np.ndarray]:
    """Each tensor's bytes copied into `staging`, back to back (one copy: GPU -> host)."""
    import torch

    flat = [tensor.reshape(-1).view(torch.uint8) for tensor in tensors]
    arrays = slices(staging, [len(f) for f in flat])
    for array, source in zip(arrays, flat, strict=True):
        torch.from_numpy(array).copy_(source)
    return arrays


def upload(arrays: Sequence[np.ndarray], blocks: Sequence[Block], dests: Sequence[Any]) -> None:
    """Every staged block checked, then all copied into place (one copy: host -> GPU): a
    block that fails its checksum raises CorruptBlock before any is written."""
    import torch

    for array, (key, meta) in zip(arrays, blocks, strict=True):
        check_stored(array.data, key, meta)
    for array, dest in zip(arrays, dests, strict=True):
        dest.reshape(-1).view(torch.uint8)[: len(array)].copy_(torch.from_numpy(array))
