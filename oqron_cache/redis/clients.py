"""Redis clients from URLs: one place that turns every URL form the library accepts (see
:mod:`oqron_cache.redis_urls`) into a client with explicit timeouts.

* ``redis://``, ``rediss://`` and ``unix://``: redis-py's ``Redis.from_url``.
* ``redis+sentinel://``: the master through redis-py's ``Sentinel``, asked for on every new
  connection, so after a failover the client follows the new master: a connection still open to
  the demoted one fails its next write (READONLY), is dropped, and the retry connects to the new
  master.
* ``redis+cluster://``: redis-py's ``RedisCluster`` (:mod:`oqron_cache.cluster`).

:func:`celery_broker` turns a Redis URL into Celery's form of the same server, for the
standalone worker whose broker defaults to the cache's Redis.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..core.errors import ConfigurationError
from .cluster import PendingCluster, connect_cluster, is_cluster_client, refresh_layout
from .urls import (
    CLUSTER_PORT,
    CLUSTER_SCHEMES,
    SENTINEL_PORT,
    SENTINEL_SCHEME,
    ClusterTarget,
    SentinelTarget,
    check_url,
    is_cluster_url,
    parse_cluster_url,
    parse_sentinel_url,
)

__all__ = [
    "CLUSTER_PORT",
    "CLUSTER_SCHEMES",
    "SENTINEL_PORT",
    "SENTINEL_SCHEME",
    "ClusterTarget",
    "PendingCluster",
    "SentinelTarget",
    "celery_broker",
    "check_url",
    "connect",
    "is_cluster_client",
    "is_cluster_url",
    "parse_cluster_url",
    "parse_sentinel_url",
    "refresh_layout",
    "sentinel_kwargs",
]


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    retries: int = 1,
    client_name: str | None = None,
    max_connections: int | None = None,
) -> redis.Redis:
    """A redis-py client for ``url`` with explicit timeouts and at most ``retries`` immediate
    retries, only on connection errors (a pooled connection to a restarted or demoted server),
    never on timeouts. Connects lazily: nothing is sent until the first command.

    A cluster URL gives a :class:`~redis.cluster.RedisCluster` (typed as ``redis.Redis``: the
    two share their commands), which asks a seed node for the layout right away. It retries
    ``retries`` times, without backoff, on connection errors *and* timeouts (redis-py's cluster
    client does not tell them apart), re-reading the layout first: what follows a failover.
    """
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
        "retry_on_timeout": False,
    }
    if client_name is not None:
        options["client_name"] = client_name
    if max_connections is not None:
        options["max_connections"] = max_connections
    scheme = urlsplit(url).scheme
    if scheme in CLUSTER_SCHEMES:
        return connect_cluster(parse_cluster_url(url), options, retries)
    if scheme != SENTINEL_SCHEME:
        check_url(url)
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_options = sentinel_kwargs(target, socket_timeout, connect_timeout)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    client: redis.Redis = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return client


def sentinel_kwargs(
    target: SentinelTarget, socket_timeout: float, connect_timeout: float
) -> dict[str, Any]:
    """The options of the clients that talk to the sentinels themselves (both fronts)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if target.sentinel_username is not None:
        options["username"] = target.sentinel_username
    if target.sentinel_password is not None:
        options["password"] = target.sentinel_password
    return options


def celery_broker(url: str, url_name: str = "redis_url") -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and ``broker_transport_options`` for the Redis that ``url`` names.

    A plain URL is returned as it is. A ``redis+sentinel://`` URL becomes kombu's form: one
    ``sentinel://`` URL per sentinel, joined by ``;`` (each carries the master's credentials and
    db), with the service name as the ``master_name`` transport option and the sentinels' own
    credentials, if any, in ``sentinel_kwargs``. A cluster URL raises
    :class:`ConfigurationError`: kombu cannot use a Redis Cluster as a broker. ``url_name``
    names the setting in errors.
    """
    if is_cluster_url(url):
        raise ConfigurationError(
            f"a Redis Cluster ({url.partition(':')[0]}://) cannot be the Celery broker: kombu "
            "does not support Redis Cluster; set the broker explicitly (OQRON_BROKER_URL for "
            "the standalone worker): a plain Redis, a sentinel:// URL or amqp://"
        )
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return url, {}
    target = parse_sentinel_url(url, url_name)
    userinfo = ""
    if target.username is not None or target.password is not None:
        userinfo = (
            f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
        )
    urls = [
        f"sentinel://{userinfo}{f'[{host}]' if ':' in host else host}:{port}/{target.db}"
        for host, port in target.sentinels
    ]
    options: dict[str, Any] = {"master_name": target.service}
    sentinel_kwargs = {
        name: value
        for name, value in (
            ("username", target.sentinel_username),
            ("password", target.sentinel_password),
        )
        if value is not None
    }
    if sentinel_kwargs:
        options["sentinel_kwargs"] = sentinel_kwargs
    return ";".join(urls), options
