"""``oqron-cache invalidate``: drop entries by key, pattern or tag.

Runs the library's own delete / pattern / tag invalidation on :func:`stand_in`, an unregistered,
Redis-only stand-in of the cache (so every process's L1 drops the entries through the bus), or
sends the invalidation task by name to a Celery broker (``--via-celery``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import redis

from ..celery.tasks import (
    INVALIDATE_PATTERN_TASK,
    INVALIDATE_TAG_TASK,
    INVALIDATE_TASK,
    MAX_KEY_CHARS,
    MAX_KEYS_PER_TASK,
)
from ..config import mask_url
from ..core.codecs import get_codec
from ..core.entry import Corrupt, unpack
from ..core.errors import ConfigurationError
from ..core.keys import Glob, KeySpace, bus_channel, matches_everything
from ..core.metrics import Stats
from ..core.options import CacheOptions, RedisTier, Stampede
from ..engine.stack import MAX_TAG_BYTES, CacheStack
from ..frontend import Cache
from ..redis.store import RedisConn, RedisStore
from .common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    AdminError,
    cache_name_arg,
    namespace_arg,
    one_line,
    redis_client,
)

# The stand-in's lock_ttl only sizes the tombstones it writes (2 x lock_ttl): long enough for a
# load begun before the invalidation under any usual application lock_ttl (up to a minute).
ADMIN_LOCK_TTL = 60.0


class _Conn(RedisConn):
    """A RedisConn that remembers its failures for the one-line message instead of logging."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.failures: list[str] = []

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.failures.append(f"{kind}: {one_line(exc)}")


class _StandIn(Cache[Any]):
    """A Redis-only cache of a given name, bound to a stack built here and never registered.

    The admin command line knows caches by name only; this runs the library's own delete and
    invalidation code on the cache's keys without declaring it (a process that declared the
    real cache keeps its registration). ``Cache.__init__`` is not called: it registers.
    """

    def __init__(self, options: CacheOptions, stack: CacheStack) -> None:
        self.options = options
        self.name = options.name
        self.clock = None
        self.stats = stack.stats
        self._stack = stack


def stand_in(client: redis.Redis, namespace: str, name: str, max_key_bytes: int) -> Cache[Any]:
    """A :class:`~oqron_cache.frontend.Cache` of ``name`` that only knows its Redis keys."""
    ttl = 1.0  # unused: the stand-in never fills
    options = CacheOptions(
        name=name,
        ttl=ttl,
        stale_ttl=0.0,
        l1=None,
        l2=RedisTier(ttl=ttl),
        stampede=Stampede(lock_ttl=ADMIN_LOCK_TTL),
        strategy="fixed",
        resolver=None,
        tags=None,
        write_through=None,
        miss="inline",
        codec="json",
        max_value_bytes=1 << 20,
        max_key_bytes=max_key_bytes,
    )
    store = RedisStore(
        _Conn(client), KeySpace(namespace, name, max_key_bytes), bus_channel(namespace)
    )
    stack = CacheStack(options, get_codec("json"), None, store, None, Stats(), time.time)
    return _StandIn(options, stack)


def _check_target(args: argparse.Namespace) -> None:
    """Usage errors of the key/pattern/tag, found before any connection."""
    if args.key is not None:
        if any(not key for key in args.key):
            raise AdminError(EXIT_USAGE, "--key: keys are never empty")
        if args.via_celery and len(args.key) > MAX_KEYS_PER_TASK:
            raise AdminError(EXIT_USAGE, f"--key: at most {MAX_KEYS_PER_TASK} keys per task")
        if args.via_celery and any(len(key) > MAX_KEY_CHARS for key in args.key):
            raise AdminError(
                EXIT_USAGE, f"--key: a task takes keys of at most {MAX_KEY_CHARS} chars"
            )
    elif args.pattern is not None:
        if not args.pattern:
            raise AdminError(EXIT_USAGE, "--pattern: a pattern must not be empty")
        if matches_everything(args.pattern):
            if args.via_celery:
                raise AdminError(
                    EXIT_USAGE,
                    f"--pattern {args.pattern!r} matches the whole cache, which the "
                    "invalidate_pattern task refuses; drop --via-celery and add --all",
                )
            if not args.all:
                raise AdminError(
                    EXIT_USAGE,
                    f"--pattern {args.pattern!r} would drop the whole cache {args.cache!r}; "
                    "add --all if that is what you mean",
                )
        if len(args.pattern) > 1024:
            raise AdminError(EXIT_USAGE, "--pattern: at most 1024 characters")
        try:
            Glob(args.pattern)
        except ConfigurationError as exc:
            raise AdminError(EXIT_USAGE, f"--pattern: {exc}") from None
    else:
        size = len(args.tag.encode("utf-8", "surrogatepass"))
        if not 1 <= size <= MAX_TAG_BYTES:
            raise AdminError(EXIT_USAGE, f"--tag: a tag holds 1..{MAX_TAG_BYTES} bytes; got {size}")


def run_invalidate(args: argparse.Namespace) -> int:
    namespace = namespace_arg(args)
    name = cache_name_arg(args.cache)
    _check_target(args)
    if args.via_celery:
        return _send_task(args, name)
    with redis_client(args) as client:
        cache = stand_in(client, namespace, name, args.max_key_bytes)
        stats = cache.stats
        if args.key is not None:
            keys = list(dict.fromkeys(args.key))
            present = _present(client, cache, keys)
            for key in keys:
                cache.delete(key)
            removed = len(present)
            if len(keys) == 1:
                done = f"deleted key {keys[0]!r}"
                none = f"no entry had key {keys[0]!r}"
            else:
                done = f"deleted {removed} of {len(keys)} keys"
                none = f"no entry had any of the {len(keys)} keys"
            none += " (tombstones were written anyway: loads in flight cannot write back)"
        elif args.pattern is not None:
            removed = cache.invalidate_pattern(args.pattern, allow_all=args.all)
            done = f"deleted {_entries(removed)} matching {args.pattern!r}"
            none = f"no entry matched {args.pattern!r}"
        else:
            removed = cache.invalidate_by_tag(args.tag)
            done = f"deleted {_entries(removed)} tagged {args.tag!r}"
            none = f"no entry carried tag {args.tag!r}"
        if stats.counts["l2_errors"]:  # the library degrades quietly; a command must not
            l2 = cache.stack.l2
            failures = l2.conn.failures if l2 is not None and isinstance(l2.conn, _Conn) else []
            cause = f" ({failures[0]})" if failures else ""
            raise AdminError(
                EXIT_UNREACHABLE,
                f"Redis at {mask_url(args.redis_url)} failed during the invalidation{cause}; "
                "it may be partial: run it again",
            )
    if not removed:
        raise AdminError(EXIT_NOT_FOUND, f"cache {name}: {none}")
    print(f"cache {name}: {done} from L2; every process's L1 was told to drop them")
    return EXIT_OK


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _present(client: redis.Redis, cache: Cache[Any], keys: list[str]) -> list[str]:
    """The keys of ``keys`` that hold an entry in L2 (not a tombstone)."""
    store = cache.stack.l2
    assert store is not None
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(store.keys.value(key))
    found = []
    for key, raw in zip(keys, pipe.execute(), strict=True):
        if raw is None:
            continue
        try:
            entry, _codec, _payload = unpack(raw)
        except Corrupt:
            found.append(key)  # something is there; the delete removes it
            continue
        if not entry.tombstone:
            found.append(key)
    return found


def _send_task(args: argparse.Namespace, name: str) -> int:
    """Send the invalidation task by name (``app.send_task``) to the broker."""
    from celery import Celery
    from kombu.exceptions import KombuError

    broker = args.broker or args.redis_url
    if args.key is not None:
        task, task_args = INVALIDATE_TASK, [name, list(dict.fromkeys(args.key))]
    elif args.pattern is not None:
        task, task_args = INVALIDATE_PATTERN_TASK, [name, args.pattern]
    else:
        task, task_args = INVALIDATE_TAG_TASK, [name, args.tag]
    app = Celery("oqron-cache-admin", broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=args.timeout,
        broker_transport_options={"socket_timeout": args.timeout},
    )
    where = f"broker at {mask_url(broker)}"
    try:
        result = app.send_task(
            task,
            args=task_args,
            queue=args.queue,
            serializer="json",
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        )
    except (KombuError, OSError, redis.RedisError) as exc:
        raise AdminError(EXIT_UNREACHABLE, f"{where} is unreachable ({one_line(exc)})") from None
    except (KeyError, ValueError, ImportError) as exc:  # kombu: unknown transport, bad URL
        raise AdminError(EXIT_USAGE, f"--broker {mask_url(broker)}: {one_line(exc)}") from None
    finally:
        with contextlib.suppress(Exception):  # closing is best effort
            app.close()
    print(
        f"sent {task} {json.dumps(task_args[1:])[1:-1]} for cache {name} to queue {args.queue} "
        f"on the {where} (task id {result.id}); a worker with cache {name!r} registered runs it"
    )
    return EXIT_OK
