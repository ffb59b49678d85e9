"""Writing one node's entries: batches of (block key, tier code, or None for removed).

On a single Redis, a batch is one WRITE script that applies it only while the
node's registration exists, so writes that race a Redis restart never land
under a slot that the emptied Redis hands to another node. Redis Cluster runs
no script across shards; there a batch is a pipeline of one WRITE_ONE per key
(grouped by shard), and the node checks its registration with a heartbeat
before it writes again after any error.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.exceptions import NoScriptError

from kvstore.cluster.connection import Client
from kvstore.cluster.layout import Layout
from kvstore.cluster.registry import Registration
from kvstore.cluster.scripts import WRITE, WRITE_ONE
from kvstore.keys import BlockKey

Change = tuple[BlockKey, "int | None"]


class EntryWriter:
    def __init__(self, redis: Client, layout: Layout, cluster: bool) -> None:
        self._redis = redis
        self._layout = layout
        self._script = None if cluster else redis.register_script(WRITE)
        self._sha: str | None = None  # WRITE_ONE, once loaded on every shard

    def write(self, reg: Registration, changes: Sequence[Change], sweep: int | None = None) -> bool:
        """Apply `changes` under `reg`'s slot, deleting `sweep`'s entries of the same keys;
        False if the registration is gone (only a single Redis can tell)."""
        sweep_arg = "" if sweep is None else sweep
        codes = ["" if code is None else code for _, code in changes]
        if self._script is None:
            self._one_by_one(reg.slot, changes, sweep_arg, codes)
            return True
        keys = [self._layout.node(reg.slot), *(self._layout.block(key) for key, _ in changes)]
        return bool(self._script(keys=keys, args=[reg.token, reg.slot, sweep_arg, *codes]))

    def _one_by_one(self, slot: int, changes: Sequence[Change], sweep: object, codes: list) -> None:
        if self._sha is None:
            self._sha = self._redis.script_load(WRITE_ONE)  # on every primary
        pipe = self._redis.pipeline(transaction=False)
        for (key, _), code in zip(changes, codes, strict=True):
            # redis-py refuses pipe.evalsha() here, yet routes the command by its one key
            pipe.execute_command(
                "EVALSHA", self._sha, 1, self._layout.block(key), slot, sweep, code
            )
        try:
            pipe.execute()
        except NoScriptError:  # a shard restarted: load it again, and let the caller retry
            self._sha = None
            raise
