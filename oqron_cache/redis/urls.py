"""The Redis URL forms the library accepts, parsed and checked (no connection is made here).

* ``redis://``, ``rediss://`` (TLS) and ``unix://``: redis-py's own URL forms.
* ``redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service[/db]``: a
  master found through Redis Sentinel. The hosts are the sentinels (port 26379 by default);
  ``service`` is the name they monitor; the user name and password, if any, are the master's.
  Two query parameters are accepted, ``sentinel_username`` and ``sentinel_password``, for
  sentinels that require authentication of their own.
* ``redis+cluster://[[username]:password@]host[:port][,host[:port]...][/0]``: a Redis Cluster.
  The hosts are seed nodes (port 6379 by default); a cluster has only db 0.
  ``rediss+cluster://`` is the same over TLS (certificates verified).

TLS to a sentinel-managed master (``rediss+sentinel://``) is refused with a clear error. Every
error is a :class:`~oqron_cache.errors.ConfigurationError` that names the setting and never
shows a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..core.errors import ConfigurationError

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
