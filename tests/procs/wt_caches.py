"""Write-through caches for ``tests/test_write_through.py`` and their origin, kept in Redis.

``celery -A workers worker`` imports this module (``OQRON_CACHE_MODULES=tests.procs.wt_caches``)
and so does the test process, so both declare the same caches by name. The origin ("the
database") is the shared Redis, under the namespace ``oqron_cache.configure()`` was given in
the calling process (``oqron:<ns>:test:...``, deleted with the namespace):

* ``...:test:origin`` (hash): key -> the JSON of the value the origin holds now;
* ``...:test:origin:log`` (list): ``"<key> <value JSON>"`` for every write the origin accepted,
  in the order it accepted them (exact counts across processes);
* ``...:test:attempts`` (hash): key -> how many times the origin was called for it;
* ``...:test:where`` (hash): key -> JSON ``pid``/``ppid``/``at`` of the call blocked right now
  (so a test knows whom to kill and when);
* ``...:test:flags`` (hash): key -> what the origin (or the cache link) does for that key,
  read at every call:

  ``reject``        raise :class:`OriginRejected` every time;
  ``fail:<n>``      raise for the first ``n`` attempts, then accept;
  ``block``         block before writing, while the flag is still ``block``;
  ``block-first``   the first attempt blocks before writing (while the flag stays), later ones
                    go through (two writes of one key applied out of order);
  ``block-after``   write, then block while the flag stays (a kill after the origin commit but
                    before the library recorded it);
  ``block-cache``   the origin writes; the *cache link* blocks (in the ``tags`` function, which
                    it calls before its compare-and-set) while the flag stays.

A blocked call gives up after :data:`BLOCK_LIMIT` seconds (a test that forgot its flag).

``python -m tests.procs.wt_caches --url URL --ns NS`` is a reader process (no Celery): it prints
``{"event": "ready"}`` once its bus listens, then answers ``{"cmd": "get", "key"}`` with
``{"event": "value", "value", "l1"}`` (``l1``: whether L1 held the key before the read) and
``{"cmd": "exit"}``. It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, cast

import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier
from oqron_cache.celery.write_through import current_write_version
from oqron_cache.redis.replies import as_int

MAIN = "wtc_main"  # every test of the chain
BLOCK_LIMIT = 60.0
TTL = "60s"

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


class OriginRejected(RuntimeError):
    """The origin refused a write (flag ``reject`` or ``fail:<n>``)."""


def test_key(namespace: str, part: str) -> str:
    """The Redis key of one of the origin's structures (``origin``, ``flags``, ...)."""
    return f"oqron:{namespace}:test:{part}"


def _context() -> tuple[redis.Redis, str]:
    runtime = oqron_cache.config.current_runtime(create=False)
    if runtime is None or runtime.settings.redis_url is None:
        raise RuntimeError("tests.procs.wt_caches needs oqron_cache.configure(redis_url=...)")
    url = runtime.settings.redis_url
    ident = (os.getpid(), url)  # a prefork child must not share its parent's sockets
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            _clients[ident] = client
    return client, runtime.settings.namespace


def _block(client: redis.Redis, namespace: str, key: str, mode: str) -> None:
    """Record who is blocked, then wait while ``key``'s flag is still ``mode``."""
    where = {"pid": os.getpid(), "ppid": os.getppid(), "at": mode}
    client.hset(test_key(namespace, "where"), key, json.dumps(where))
    deadline = time.monotonic() + BLOCK_LIMIT
    flags = test_key(namespace, "flags")
    while (
        cast("bytes | None", client.hget(flags, key)) == mode.encode()
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    client.hdel(test_key(namespace, "where"), key)


def origin_write(key: str, value: Any) -> None:
    """The write-through function: the origin accepts (or refuses) ``value`` for ``key``."""
    client, namespace = _context()
    attempt = as_int(client.hincrby(test_key(namespace, "attempts"), key, 1))
    flag = (cast("bytes | None", client.hget(test_key(namespace, "flags"), key)) or b"").decode()
    if flag == "reject":
        raise OriginRejected(f"origin refuses {key} (attempt {attempt})")
    if flag.startswith("fail:") and attempt <= int(flag[5:]):
        raise OriginRejected(f"origin fails {key} (attempt {attempt} of {flag[5:]})")
    if flag == "block" or (flag == "block-first" and attempt == 1):
        _block(client, namespace, key, flag)
    # An idempotent origin, as the library advises: a write whose version it already has (a link
    # redelivered after a crash) is not applied twice.
    version = current_write_version()
    if version is not None and client.sismember(test_key(namespace, "versions"), version):
        return
    text = json.dumps(value, sort_keys=True)
    pipe = client.pipeline(transaction=True)
    pipe.hset(test_key(namespace, "origin"), key, text)
    pipe.rpush(test_key(namespace, "origin:log"), f"{key} {text}")
    if version is not None:
        pipe.sadd(test_key(namespace, "versions"), version)
    pipe.execute()
    if flag == "block-after":
        _block(client, namespace, key, flag)


def cache_gate(key: str, value: Any) -> list[str]:
    """The ``tags`` function: no tags, but the cache link blocks here on ``block-cache``."""
    client, namespace = _context()
    if cast("bytes | None", client.hget(test_key(namespace, "flags"), key)) == b"block-cache":
        _block(client, namespace, key, "block-cache")
    return []


main_cache = oqron_cache.cache(
    MAIN,
    tiers=[MemoryTier(max_size=10_000, ttl=TTL), RedisTier(ttl=TTL)],
    write_through=origin_write,
    tags=cache_gate,
)


# -- the reader process ---------------------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _serve(url: str, namespace: str) -> None:
    oqron_cache.configure(redis_url=url, namespace=namespace)
    runtime = oqron_cache.config.current_runtime()
    deadline = time.monotonic() + 20
    while runtime.bus is None or not runtime.bus.healthy:
        if time.monotonic() > deadline:
            raise RuntimeError("the bus did not start listening within 20 s")
        time.sleep(0.01)
    _emit("ready", pid=os.getpid())
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "exit":
            break
        key = command["key"]
        l1 = main_cache.stack.l1
        held = l1 is not None and l1.get(key) is not None
        _emit("value", value=main_cache.get(key), l1=held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ns", required=True)
    args = parser.parse_args()
    try:
        _serve(args.url, args.ns)
    except Exception:
        _emit("error", error=traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":
    main()
