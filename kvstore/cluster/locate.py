"""Reading the index: per node, how many leading blocks of a prompt it holds, and where.

On a single Redis this is one EVALSHA of the LOCATE script. Redis Cluster runs
no script over keys of several hash slots, so there the blocks are read with
one pipeline per shard, the records of the nodes that hold the first block with
a second (one shard: the registry's), and the runs are counted here. Stale
words are not deleted on that path; their owners' re-publishes delete them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import ResponseError

from kvstore.cluster.connection import REDIS_ERRORS, Client, LazyClient
from kvstore.cluster.layout import RECORD_FIELDS, TIERS, Layout, words
from kvstore.cluster.registry import decode_load, passed_over, trusted
from kvstore.cluster.scoring import Scorer, check_weights, rank
from kvstore.cluster.scripts import LOCATE
from kvstore.errors import Unavailable
from kvstore.results import Location
from kvstore.trust import ClusterSecret


class Locator:
    def __init__(
        self,
        client: LazyClient,
        layout: Layout,
        weights: Mapping[str, float] | None,
        scorer: Scorer,
        seed: int | None,
        secret: ClusterSecret,
    ) -> None:
        self._secret = secret  # holders whose record fails it are left out
        self._client = client
        self._layout = layout
        self._weights = check_weights(weights)
        self._scorer = scorer
        self._rng = random.Random(seed)  # breaks ties between equal scores
        self._script: Script | None = None

    def locate(self, keys: Sequence[bytes]) -> list[Location]:
        """Nodes holding a prefix of `keys`, best first; nodes holding nothing are left out.

        Raises InvalidArgument for a malformed key and Unavailable if Redis is.
        """
        names = self._layout.blocks(keys)
        if not names:
            return []
        try:
            redis = self._client.get()
            if isinstance(redis, RedisCluster):
                found = self._pipelined(redis, names)
            else:
                found = self._scripted(redis, names)
        except REDIS_ERRORS as exc:
            raise Unavailable(f"cluster index at {self._client.target.shown}: {exc}") from exc
        return rank([loc for loc in found if loc], self._weights, self._scorer, self._rng)

    def _scripted(self, redis: Client, names: list[bytes]) -> list[Location | None]:
        if self._script is None:
            self._script = redis.register_script(LOCATE)
        flat = self._script(keys=names, args=[self._layout.node_prefix], client=redis)
        return [
            self._location(flat[i + 7], flat[i : i + 7], flat[i + 8], flat[i + 9 : i + 12])
            for i in range(0, len(flat), 12)
        ]

    def _location(
        self, slot: int | bytes, record: Sequence, matched: int, counts: Sequence[int]
    ) -> Location | None:
        """A holder, if its record is signed with the cluster's secret and decodes; else
        None (a record that does not decode is logged, once)."""
        node_id, address, data_address, load, incarnation, expires, sig = record
        if not trusted(
            self._secret, slot, node_id, incarnation, address, data_address, expires, sig
        ):
            return None
        tiers = {tier: n for tier, n in zip(TIERS, counts, strict=True) if n}
        try:
            int(incarnation)
            return Location(
                node_id.decode(), address.decode(), data_address.decode(), matched, tiers,
                decode_load(load),
            )  # fmt: skip
        except ValueError as exc:  # a bad load (BadRecord) or incarnation, a name not UTF-8
            passed_over(slot, node_id, exc)
            return None

    def _pipelined(self, redis: RedisCluster, names: list[bytes]) -> list[Location | None]:
        values = _by_shard(redis, [("GET", name) for name in names])
        first = words(values[0])
        if not first:
            return []
        reads = [("HMGET", self._layout.node(slot), *RECORD_FIELDS) for slot in first]
        records = dict(zip(first, _by_shard(redis, reads), strict=True))
        runs = {slot: [0] * len(TIERS) for slot, rec in records.items() if rec[0] is not None}
        matched = dict.fromkeys(runs, 0)
        active = set(runs)
        for i, value in enumerate(values):
            held = words(value)
            active = {slot for slot in active if slot in held}
            if not active:
                break
            for slot in active:
                runs[slot][held[slot]] += 1
                matched[slot] = i + 1
        return [self._location(slot, records[slot], matched[slot], runs[slot]) for slot in runs]


def _by_shard(redis: RedisCluster, commands: list[tuple]) -> list:
    """Run each (command, key, *args) with one plain pipeline per shard, in turn: a fifth
    of the Python time of redis-py's cluster pipeline, which routes and wraps each command.
    While slots move (MOVED, ASK), that pipeline runs them instead: it follows redirects."""
    by_shard: dict[str, tuple[ClusterNode, list[int]]] = {}
    for i, command in enumerate(commands):
        node = redis.get_node_from_key(command[1])
        by_shard.setdefault(node.name, (node, []))[1].append(i)
    replies: list = [None] * len(commands)
    try:
        for node, positions in by_shard.values():
            pipe = redis.get_redis_connection(node).pipeline(transaction=False)
            for i in positions:
                pipe.execute_command(*commands[i])
            for i, reply in zip(positions, pipe.execute(), strict=True):
                replies[i] = reply
    except ResponseError:
        pipe = redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()
    return replies
