"""What the library's Celery tasks do: checks of their JSON arguments, and the task bodies.

Each body takes the message's arguments as they arrived, checks their types and sizes, looks the
cache up in the registry (never imports a dotted path from a message) and hands the work to
library code. A message with bad arguments raises :class:`TaskArgumentError`, which
:func:`guarded` logs and turns into a ``"rejected"`` outcome: the message is dropped, never
retried. An invalidation that Redis interrupted raises :class:`InvalidationIncomplete`, so the
task is retried. :mod:`.tasks` registers these bodies on the user's app.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from ..core.errors import OqronCacheError, UnknownCacheError
from ..core.keys import printable
from ..engine import registry

# The logger keeps the name it had when this code lived in tasks.py, so logging configurations
# (and tests) that select "oqron_cache.tasks" still see rejected messages.
log = logging.getLogger("oqron_cache.tasks")

MAX_KEY_CHARS = 64 * 1024
MAX_KEYS_PER_TASK = 10_000


class InvalidationIncomplete(OqronCacheError, ConnectionError):
    """Redis failed during an invalidation task: it is retried (the message is not lost)."""


class TaskArgumentError(OqronCacheError, ValueError):
    """A task message carried arguments of the wrong type or size (it is dropped, logged)."""


def text_arg(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TaskArgumentError(f"{name} must be a str; got {type(value).__name__}")
    if not value or len(value) > limit:
        raise TaskArgumentError(f"{name} must hold 1..{limit} characters; got {len(value)}")
    return value


def lookup_cache(cache_name: object) -> Any:
    return registry.lookup(text_arg(cache_name, "cache", 200))


def guarded(task_name: str, body: Any, *args: Any) -> Any:
    """Run a task body; bad messages are logged and dropped (acked), never retried."""
    try:
        outcome = body(*args)
    except (TaskArgumentError, UnknownCacheError) as exc:
        log.error("%s rejected: %s", task_name, exc)
        return "rejected"
    return outcome


@contextlib.contextmanager
def _complete(cache: Any) -> Iterator[None]:
    """Raise :class:`InvalidationIncomplete` if Redis failed during the block (so the task is
    retried rather than acknowledged as done)."""
    before = cache.stats.counts["l2_errors"]
    yield
    if cache.stats.counts["l2_errors"] != before:
        raise InvalidationIncomplete(
            f"Redis failed while invalidating in cache {cache.name!r}; retrying", cache=cache.name
        )


def do_refresh(cache_name: object, key: object, token: object, seen_version: object) -> str:
    """Body of ``oqron_cache.refresh``."""
    from ..engine.refresh import run_refresh

    cache = lookup_cache(cache_name)
    key_text = text_arg(key, "key", MAX_KEY_CHARS)
    if not isinstance(token, str) or len(token) > 64:
        raise TaskArgumentError("token must be a str of at most 64 characters")
    if not isinstance(seen_version, str) or len(seen_version) > 16:
        raise TaskArgumentError("seen_version must be a hex str of at most 16 characters")
    try:
        seen = bytes.fromhex(seen_version)
    except ValueError:
        raise TaskArgumentError("seen_version must be hex") from None
    outcome = run_refresh(cache.stack, key_text, token, seen)
    log.info("refresh %s %s: %s", cache.name, printable(key_text), outcome)
    return outcome


def do_invalidate(cache_name: object, keys: object) -> str:
    """Body of ``oqron_cache.invalidate``: delete each key everywhere."""
    cache = lookup_cache(cache_name)
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_TASK:
        raise TaskArgumentError(f"keys must be a list of at most {MAX_KEYS_PER_TASK} str")
    checked = [text_arg(k, "key", MAX_KEY_CHARS) for k in keys]
    with _complete(cache):
        for key in checked:
            cache.delete(key)
    return f"deleted {len(checked)}"


def do_invalidate_pattern(cache_name: object, pattern: object) -> str:
    """Body of ``oqron_cache.invalidate_pattern`` (``"*"`` is refused, as in the API)."""
    cache = lookup_cache(cache_name)
    text = text_arg(pattern, "pattern", 1024)
    try:
        with _complete(cache):
            removed = cache.invalidate_pattern(text)
    except ValueError as exc:
        raise TaskArgumentError(str(exc)) from None
    return f"deleted {removed}"


def do_invalidate_by_tag(cache_name: object, tag: object) -> str:
    """Body of ``oqron_cache.invalidate_by_tag``."""
    cache = lookup_cache(cache_name)
    text = text_arg(tag, "tag", 256)
    with _complete(cache):
        removed = cache.invalidate_by_tag(text)
    return f"deleted {removed}"


def number_arg(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskArgumentError(f"created_at must be a number; got {type(value).__name__}")
    return float(value)
