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

``redis+cluster://`` is refused with a clear error (not supported yet), as is TLS to a
sentinel-managed master (``rediss+sentinel://``).

:func:`celery_broker` turns a Redis URL into Celery's form of the same server, for the
standalone worker whose broker defaults to the cache's Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

from .errors import ConfigurationError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
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


def _bad(url_name: str, what: str) -> ConfigurationError:
    return ConfigurationError(
        f"{url_name}: {what}; expected "
        "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]"
    )


def _host_port(text: str, url_name: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _bad(url_name, f"sentinel address {text!r} is malformed")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(url_name, f"sentinel address {text!r} has no host")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url_name, f"sentinel port {port_text!r} is not a port number")
    return host, int(port_text)


def parse_sentinel_url(url: str, url_name: str = "redis_url") -> SentinelTarget:
    """Parse a ``redis+sentinel://`` URL; :class:`ConfigurationError` naming ``url_name`` if
    it is malformed (no sentinel, no service, a bad port or db, an unknown query parameter)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise _bad(url_name, f"scheme is {parts.scheme!r}, not {SENTINEL_SCHEME!r}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
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
    never on timeouts. Connects lazily: nothing is sent until the first command."""
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
    if urlsplit(url).scheme != SENTINEL_SCHEME:
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


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and ``broker_transport_options`` for the Redis that ``url`` names.

    A plain URL is returned as it is. A ``redis+sentinel://`` URL becomes kombu's form: one
    ``sentinel://`` URL per sentinel, joined by ``;`` (each carries the master's credentials and
    db), with the service name as the ``master_name`` transport option and the sentinels' own
    credentials, if any, in ``sentinel_kwargs``.
    """
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return url, {}
    target = parse_sentinel_url(url)
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
