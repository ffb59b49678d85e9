"""The kvstore daemon: a thin gRPC layer over `kvstore.store.Store`."""

from kvstore.server.main import Daemon, main

__all__ = ["Daemon", "main"]
