"""Redis URLs and the clients made from them.

Parsing is separate from connecting: a malformed URL fails a node's start at
once, while a Redis that does not answer must not (the node serves local-only
and keeps retrying), so clients are made on first use.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from kvstore.errors import InvalidArgument

Client = redis.Redis | RedisCluster
# What a Redis call may raise when Redis is down, restarting or resharding.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)

_SCHEMES = {  # scheme -> whether it names a Redis Cluster
    "redis": False,
    "rediss": False,
    "unix": False,
    "redis+cluster": True,
    "rediss+cluster": True,
}
_DB = re.compile(r"^/?(\d*)$")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    url: str  # as redis-py takes it: any `+cluster` dropped from the scheme
    cluster: bool
    shown: str  # for logs and errors: no user name or password

    def connect(self, timeout_s: float) -> Client:
        """A client; RedisCluster reads the cluster's layout here, so it may raise REDIS_ERRORS."""
        options = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            # one quick retry: a pooled socket may predate a restart; the index retries the rest
            "retry": Retry(NoBackoff(), 1),
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        return redis.Redis.from_url(self.url, **options)


def parse_redis_url(url: object, field: str = "redis_url") -> RedisTarget:
    """Validate `url`: redis://, rediss:// (TLS), unix://, redis+cluster:// or rediss+cluster://."""
    if not isinstance(url, str):
        raise InvalidArgument(field, f"must be a string, got {type(url).__name__}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidArgument(field, f"expected a {', '.join(_SCHEMES)} URL, got {scheme!r}")
    cluster = _SCHEMES[scheme]
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None
    shown = f"{scheme}://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"
    if scheme == "unix":
        if not parts.path:
            raise InvalidArgument(field, "a unix:// URL needs a socket path")
    else:
        if not parts.hostname:
            raise InvalidArgument(field, f"names no host: {shown}")
        db = _DB.match(parts.path)
        if db is None or (cluster and db.group(1) not in ("", "0")):
            raise InvalidArgument(field, f"bad database in {shown} (Redis Cluster has only 0)")
    plain = urlunsplit(parts._replace(scheme=scheme.removesuffix("+cluster")))
    try:
        redis.connection.parse_url(plain)  # query options such as ?ssl_cert_reqs=none
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None
    return RedisTarget(plain, cluster, shown)


class LazyClient:
    """One client, made on first use and shared by threads (redis-py clients pool connections)."""

    def __init__(self, target: RedisTarget, timeout_s: float) -> None:
        self.target = target
        self._timeout_s = timeout_s
        self._client: Client | None = None
        self._lock = threading.Lock()

    def get(self) -> Client:
        client = self._client
        if client is None:  # connect outside the lock: it may take a timeout or two
            client = self.target.connect(self._timeout_s)
            with self._lock:
                if self._client is None:
                    self._client = client
                else:  # another thread won the race
                    client.close()
                    client = self._client
        return client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
