"""NIXL agents as kvstore uses them, on both sides of the NIXL path (client/nixl.py,
server/nixl.py). NIXL is optional: it is imported here only, when a path asks for it,
and a host without it gets `Unsupported` saying how to install it.

An agent runs no progress thread (NIXL's own spins a core while idle): whoever waits for
a transfer makes progress by calling into its agent, and only while that transfer is in
flight. Agents are shared by threads (NIXL's strict sync mode).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kvstore.errors import Unavailable, Unsupported

INSTALL = "pip install --no-deps nixl-cu12==1.5.1"  # its dependencies pull a CUDA torch
_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
_api: ModuleType | None = None
_why = ""
_load_lock = threading.Lock()


def load() -> ModuleType:
    """NIXL's Python API; `Unsupported`, saying why, where it cannot be imported."""
    global _api, _why
    with _load_lock:
        if _api is None and not _why:
            os.environ.setdefault("UCX_LOG_FILE", "stderr")  # not stdout: a daemon's banner
            errors = []
            for name in _MODULES:
                try:
                    _api = importlib.import_module(name)
                    break
                except Exception as exc:  # not installed, or a wheel for another CUDA
                    errors.append(f"{name}: {exc}")
            if _api is None:
                _why = f"NIXL is not installed ({INSTALL}): " + "; ".join(errors)
            else:  # NIXL logs INFO to stdout: warnings only, and where the process logs
                nixl_log = logging.getLogger("nixl")
                nixl_log.handlers.clear()
                nixl_log.propagate = True
                nixl_log.setLevel(logging.WARNING)
    if _api is None:
        raise Unsupported(_why)
    return _api


def why_not() -> str:
    """Why NIXL cannot be used here, or "" if it can."""
    try:
        load()
    except Unsupported as exc:
        return str(exc)
    return ""


@dataclass(frozen=True, slots=True)
class Region:
    """Memory registered with an agent: host memory (DRAM), or a GPU's (VRAM)."""

    addr: int
    size: int
    vram: bool = False
    device: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.size

    def holds(self, addr: int, size: int) -> bool:
        return self.addr <= addr and addr + size <= self.end

    @property
    def kind(self) -> str:
        return "VRAM" if self.vram else "DRAM"


class Agent:
    """One NIXL agent with the UCX backend; UCX picks its transports (UCX_TLS)."""

    def __init__(self, name: str) -> None:
        api = load()
        config = api.nixl_agent_config(
            enable_prog_thread=False,
            backends=[],
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self._agent: Any = api.nixl_agent(name, config)
            self._agent.create_backend("UCX", {})
        except Exception as exc:  # no UCX plugin, or UCX refused this host's settings
            raise Unsupported(f"NIXL's UCX backend did not start: {exc}") from None
        self.name = name

    def register(self, region: Region) -> None:
        self._agent.register_memory(_descs(region), region.kind)

    def metadata(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """The name of the agent `metadata` describes, now reachable."""
        name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_peer(self, name: str) -> None:
        self._agent.remove_remote_agent(name)

    def progress(self) -> None:
        """Let transfers in flight make progress (a peer's WRITE or READ of our memory)."""
        self._agent.get_new_notifs()

    def move(
        self,
        op: str,
        local: Sequence[tuple[int, int]],
        remote: Sequence[tuple[int, int]],
        remote_region: Region,
        peer: str,
        deadline: float,
    ) -> None:
        """WRITE local host memory to the peer's, or READ the peer's into it: (address,
        size) pairs, one per block, in `remote_region`. Unavailable if the peer is gone,
        TimeoutError past `deadline` (time.monotonic()). Either way the transfer may still
        be under way: the caller removes the peer before it frees the memory involved."""
        agent = self._agent
        mine = agent.get_xfer_descs(_table(local, 0), "DRAM")
        theirs = agent.get_xfer_descs(_table(remote, remote_region.device), remote_region.kind)
        try:
            handle = agent.initialize_xfer(op, mine, theirs, peer)
        except Exception as exc:
            raise Unavailable(f"NIXL {op} to {peer} could not start: {exc}") from None
        try:
            state = agent.transfer(handle)
            while state == "PROC":  # only while this transfer is in flight
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL {op} to {peer} passed its deadline")
                state = agent.check_xfer_state(handle)
        except TimeoutError:
            raise
        except Exception as exc:  # NIXL raises its own errors (a peer disconnected, ...)
            raise Unavailable(f"NIXL {op} to {peer} failed: {exc}") from None
        finally:
            with contextlib.suppress(Exception):  # in flight past a deadline: the caller
                handle.release()  # removes the peer, which ends it
        if state != "DONE":
            raise Unavailable(f"NIXL {op} to {peer} failed (the peer is gone?)")


def _descs(region: Region) -> np.ndarray:
    return np.array([[region.addr, region.size, region.device]], dtype=np.uint64)


def _table(pairs: Sequence[tuple[int, int]], device: int) -> np.ndarray:
    table = np.empty((len(pairs), 3), dtype=np.uint64)
    table[:, :2] = pairs
    table[:, 2] = device
    return table


def address(buffer: object) -> Region:
    """The memory of a contiguous buffer: a numpy array, anything with the buffer protocol,
    or a torch tensor (a CUDA one is VRAM)."""
    if hasattr(buffer, "data_ptr") and hasattr(buffer, "is_cuda"):  # torch, not imported here
        tensor: Any = buffer
        if not tensor.is_contiguous():
            raise ValueError("the tensor is not contiguous")
        size = tensor.numel() * tensor.element_size()
        device = tensor.device.index or 0
        return Region(
            tensor.data_ptr(), size, bool(tensor.is_cuda), device if tensor.is_cuda else 0
        )
    array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, np.uint8)  # type: ignore[call-overload]
    if not array.flags.c_contiguous:
        raise ValueError("the buffer is not contiguous")
    return Region(array.ctypes.data, array.nbytes)
