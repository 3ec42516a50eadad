"""Redis clients from URLs: one place that knows every URL form the library accepts.

* ``redis://``, ``rediss://`` (TLS) and ``unix://``: redis-py's own URL forms.
* ``redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service[/db]``: a
  master found through Redis Sentinel. The hosts are the sentinels (port 26379 by default);
  ``service`` is the name they monitor; the user name and password, if any, are the master's.
  Two query parameters are accepted, ``sentinel_username`` and ``sentinel_password``, for
  sentinels that require authentication of their own. The client asks the sentinels for the
  master on every new connection, so after a failover it follows the new master: a connection
  still open to the demoted one fails its next write (READONLY), is dropped, and the retry
  connects to the new master.

* ``redis+cluster://[[username]:password@]host[:port][,host[:port]...][/0]``: a Redis Cluster
  (redis-py's :class:`~redis.cluster.RedisCluster`). The hosts are seed nodes (port 6379 by
  default): any reachable one tells the client the cluster's layout. A cluster has only db 0.
  ``rediss+cluster://`` is the same over TLS (certificates verified). Unlike the other forms,
  a cluster client needs the layout before its first command; when no seed node answers at
  :func:`connect`, the client returned asks again on use (at most once a second), failing with
  ``ConnectionError`` until one does: start-up does not depend on the cluster being up.

TLS to a sentinel-managed master (``rediss+sentinel://``) is refused with a clear error.

:func:`celery_broker` turns a Redis URL into Celery's form of the same server, for the
standalone worker whose broker defaults to the cache's Redis.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis._parsers import Encoder
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from .errors import ConfigurationError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_PORT = 6379
_SENTINEL_FORM = "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]"
_CLUSTER_FORM = "redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0]"
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:  # never the passwords
        return f"SentinelTarget(sentinels={self.sentinels!r}, service={self.service!r})"


@dataclass(frozen=True)
class ClusterTarget:
    """What a ``redis+cluster://`` URL names (see the module docstring)."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never the password
        return f"ClusterTarget(nodes={self.nodes!r}, tls={self.tls!r})"


def _bad(url_name: str, what: str, form: str = _SENTINEL_FORM) -> ConfigurationError:
    return ConfigurationError(f"{url_name}: {what}; expected {form}")


def _host_port(
    text: str, url_name: str, default: int = SENTINEL_PORT, kind: str = "sentinel"
) -> tuple[str, int]:
    form = _SENTINEL_FORM if kind == "sentinel" else _CLUSTER_FORM
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _bad(url_name, f"{kind} address {text!r} is malformed", form)
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(url_name, f"{kind} address {text!r} has no host", form)
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url_name, f"{kind} port {port_text!r} is not a port number", form)
    return host, int(port_text)


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, hosts) of a URL's netloc."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, hosts
    user_text, colon, password_text = userinfo.partition(":")
    return unquote(user_text) or None, unquote(password_text) if colon else None, hosts


def is_cluster_url(url: str) -> bool:
    """Does ``url`` name a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)?"""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def parse_cluster_url(url: str, url_name: str = "redis_url") -> ClusterTarget:
    """Parse a ``redis+cluster://`` URL; :class:`ConfigurationError` naming ``url_name`` if it
    is malformed (no node, a bad port, a db other than 0, a query parameter)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _bad(url_name, "the URL cannot be parsed", _CLUSTER_FORM) from None
    if parts.scheme not in CLUSTER_SCHEMES:
        raise _bad(url_name, f"scheme is {parts.scheme!r}, not 'redis+cluster'", _CLUSTER_FORM)
    username, password, hosts = _userinfo(parts.netloc)
    if not hosts:
        raise _bad(url_name, "no cluster node", _CLUSTER_FORM)
    nodes = tuple(_host_port(h, url_name, CLUSTER_PORT, "cluster node") for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    if len(path) > 1 or (path and path[0] != "0"):
        raise _bad(url_name, f"path {parts.path!r}: a Redis Cluster has only db 0", _CLUSTER_FORM)
    if parts.query or parts.fragment:
        raise _bad(url_name, "query parameters are not supported", _CLUSTER_FORM)
    return ClusterTarget(nodes, parts.scheme == "rediss+cluster", username, password)


def parse_sentinel_url(url: str, url_name: str = "redis_url") -> SentinelTarget:
    """Parse a ``redis+sentinel://`` URL; :class:`ConfigurationError` naming ``url_name`` if
    it is malformed (no sentinel, no service, a bad port or db, an unknown query parameter)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise _bad(url_name, f"scheme is {parts.scheme!r}, not {SENTINEL_SCHEME!r}")
    username, password, hosts = _userinfo(parts.netloc)
    if not hosts:
        raise _bad(url_name, "no sentinel host")
    sentinels = tuple(_host_port(h, url_name) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise _bad(url_name, "no service name (the master's name the sentinels monitor)")
    if len(path) > 2:
        raise _bad(url_name, f"path {parts.path!r} has more than /service/db")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise _bad(url_name, f"db {path[1]!r} is not a number")
        db = int(path[1])
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(_SENTINEL_QUERY))
    if unknown:
        raise _bad(url_name, f"unknown query parameter {unknown[0]!r} (known: {_SENTINEL_QUERY})")
    return SentinelTarget(
        sentinels,
        unquote(path[0]),
        db,
        username,
        password,
        query.get("sentinel_username", [None])[-1],
        query.get("sentinel_password", [None])[-1],
    )


def check_url(url: str, url_name: str = "redis_url") -> None:
    """Raise :class:`ConfigurationError` for URL forms this module cannot connect to."""
    scheme = urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url, url_name)
    elif scheme in CLUSTER_SCHEMES:
        parse_cluster_url(url, url_name)
    elif scheme == "rediss+sentinel":
        raise ConfigurationError(
            f"{url_name} scheme 'rediss+sentinel' is not supported yet: TLS to a "
            "sentinel-managed master; use redis+sentinel:// on a trusted network"
        )


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
        return _connect_cluster(parse_cluster_url(url), options, retries)
    if scheme != SENTINEL_SCHEME:
        check_url(url)
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if target.sentinel_username is not None:
        sentinel_options["username"] = target.sentinel_username
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return client


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
        return Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]

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
            client.nodes_manager.initialize()  # type: ignore[no-untyped-call]


def _connect_cluster(target: ClusterTarget, options: dict[str, Any], retries: int) -> redis.Redis:
    options = {k: v for k, v in options.items() if k not in ("retry", "retry_on_timeout")}
    if target.username is not None:
        options["username"] = target.username
    if target.password is not None:
        options["password"] = target.password
    if target.tls:
        options["ssl"] = True

    def make() -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],  # type: ignore[no-untyped-call]
            retry=Retry(NoBackoff(), retries),
            # A slot whose node is down must fail alone (P1 degrades its entries), not the client.
            require_full_coverage=False,
            **options,
        )

    try:
        return cast("redis.Redis", make())
    except (RedisClusterException, redis.RedisError, OSError) as exc:
        return cast("redis.Redis", PendingCluster(make, exc))


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
