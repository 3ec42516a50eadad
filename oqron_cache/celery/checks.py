"""The Celery settings the library refuses: pickle anywhere, or this library's URL forms given
to kombu (which would read them as a Redis on localhost)."""

from __future__ import annotations

from typing import Any

from ..core.errors import ConfigurationError


def check_celery_app(app: Any) -> None:
    """Refuse a Celery app that would accept or send pickle (remote code execution)."""
    conf = getattr(app, "conf", None)
    if conf is None:
        raise TypeError(f"celery_app must be a celery.Celery; got {type(app).__name__}")
    for setting in ("task_serializer", "result_serializer"):
        if _is_pickle(conf.get(setting, "json")):
            raise ConfigurationError(f"pickle is not allowed; use json (celery {setting})")
    for setting in ("accept_content", "result_accept_content"):
        accepted = conf.get(setting) or []
        if any(_is_pickle(item) for item in accepted):
            raise ConfigurationError(f"pickle is not allowed; use json (celery {setting})")
    broker = str(conf.get("broker_url") or "")
    scheme = broker.partition("://")[0] if "://" in broker else ""
    if scheme in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        # kombu reads "redis+x://..." as transport "redis" with no host: localhost:6379.
        raise ConfigurationError(
            f"celery broker_url {scheme}:// is this library's URL form, not kombu's: kombu "
            "would queue on localhost:6379; give Celery oqron_cache.clients.celery_broker(url) "
            "(a sentinel:// URL and its broker_transport_options)"
        )


def _is_pickle(content_type: object) -> bool:
    # kombu registers pickle both as "pickle" and as its content type.
    text = str(content_type).lower()
    return "pickle" in text or "x-python-serialize" in text
