"""The Redis Cluster client: made from a parsed ``redis+cluster://`` URL, even while no node
answers (:class:`PendingCluster`), and told to re-read the slot layout after a failover.

redis-py's :class:`~redis.cluster.RedisCluster` needs the layout before its first command;
when no seed node answers when it is made, :func:`connect_cluster` returns a stand-in that asks
again on use (at most once a second), failing with ``ConnectionError`` until one does, so
start-up does not depend on the cluster being up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, cast

import redis
from redis._parsers import Encoder
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .urls import ClusterTarget

_AUTH_WORDS = ("WRONGPASS", "NOAUTH", "NOPERM", "username-password", "Authentication required")


class PendingCluster:
    """Stands for a :class:`RedisCluster` that could not be made yet (no seed node answered).

    Any other attribute is the client's once it is made; before that, it is a function that
    makes the client (at most one attempt a second) and calls the client's method, or raises
    ``ConnectionError``, which callers already treat as Redis being down
    (``AuthenticationError`` if the nodes refused the credentials).
    """

    RETRY_EVERY = 1.0

    def __init__(self, make: Any, first_error: BaseException) -> None:
        self._make = make
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()
        self._next_try = time.monotonic() + self.RETRY_EVERY
        self._error = first_error

    def get_encoder(self) -> Encoder:
        """The encoder scripts hash their text with (the cluster client's default one)."""
        return Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Script:
        """A script run through this stand-in (so through the client once it is made)."""
        return Script(cast("redis.Redis", self), script)

    def client(self) -> RedisCluster:
        """The cluster client, made now if it was not yet; ``ConnectionError`` if it cannot."""
        with self._lock:
            if self._client is None:
                now = time.monotonic()
                if now >= self._next_try:
                    self._next_try = now + self.RETRY_EVERY
                    try:
                        self._client = self._make()
                    except (RedisClusterException, redis.RedisError, OSError) as exc:
                        self._error = exc
                if self._client is None:
                    text = str(self._error)
                    if any(word in text for word in _AUTH_WORDS):
                        raise redis.AuthenticationError(
                            f"the Redis Cluster refused the credentials ({text[:200]})"
                        )
                    raise RedisConnectionError(
                        f"no node of the Redis Cluster answers ({text[:200]})"
                    )
            return self._client

    def __getattr__(self, name: str) -> Any:
        if self._client is not None:
            return getattr(self._client, name)

        def later(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.client(), name)(*args, **kwargs)

        return later

    @property
    def made(self) -> RedisCluster | None:
        """The cluster client, if it was made already."""
        return self._client

    def close(self) -> None:
        """Close the client if it was made."""
        if self._client is not None:
            self._client.close()


def is_cluster_client(client: object) -> bool:
    """Is ``client`` (as :func:`connect` returned it) a Redis Cluster client?"""
    return isinstance(client, (RedisCluster, PendingCluster))


def refresh_layout(client: object) -> None:
    """A cluster client asks the nodes for the slot layout again; anything else: nothing.

    After a primary dies and its replica takes over, the client keeps the dead node's address
    for those slots until a command of its own is redirected; a pub/sub connection, which
    sends no such command, would reconnect to the dead node forever. Failures are left to the
    next attempt.
    """
    if isinstance(client, PendingCluster):
        client = client.made
    if isinstance(client, RedisCluster):
        with contextlib.suppress(RedisClusterException, redis.RedisError, OSError):
            nodes: Any = client.nodes_manager  # untyped before redis-py 7, typed after
            nodes.initialize()


def connect_cluster(target: ClusterTarget, options: dict[str, Any], retries: int) -> redis.Redis:
    options = {k: v for k, v in options.items() if k not in ("retry", "retry_on_timeout")}
    if target.username is not None:
        options["username"] = target.username
    if target.password is not None:
        options["password"] = target.password
    if target.tls:
        options["ssl"] = True

    def make() -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
            retry=Retry(NoBackoff(), retries),
            # A slot whose node is down must fail alone (P1 degrades its entries), not the client.
            require_full_coverage=False,
            **options,
        )

    try:
        return cast("redis.Redis", make())
    except (RedisClusterException, redis.RedisError, OSError) as exc:
        return cast("redis.Redis", PendingCluster(make, exc))
