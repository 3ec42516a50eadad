"""The WSGI app of the fork tests: ``gunicorn --preload -w 2 tests.procs.fork_app:app``.

At import, so in gunicorn's master before it forks the workers, it calls
``oqron_cache.configure()`` (Redis and namespace from ``$OQRON_REDIS_URL`` and
``$OQRON_NAMESPACE``), declares the cache ``fork`` and reads the key ``warm`` once: the first
use is in the master. The cache's clock is a shared-memory offset made before the fork, so a
``/tick`` through any worker moves every process's clock together.

GET endpoints, JSON answers, each with this process's ``pid``:

``/ping``; ``/get?key=`` -> ``value`` and ``local`` (this process's counters);
``/delete?key=``; ``/stats`` -> ``cluster`` (every process's, after flushing this one) and
``local``; ``/tick?seconds=`` (moves the shared clock).

Every endpoint takes ``hold=<seconds>`` (sleep after the work, before answering: a sync worker
busy with it cannot take the next request, which then reaches another worker) and
``only=<pid>`` (any other worker sleeps ``hold`` and answers 409 without doing the work).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from multiprocessing.sharedctypes import RawValue
from typing import Any
from urllib.parse import parse_qs

import oqron_cache
from tests.procs.forking import Origin

START = 1_800_000_000.0
_offset: Any = RawValue("d", 0.0)  # shared with the workers (an anonymous shared mapping)


def clock() -> float:
    """The shared test clock (seconds)."""
    return START + float(_offset.value)


oqron_cache.configure()
origin = Origin(os.environ["OQRON_REDIS_URL"], os.environ["OQRON_NAMESPACE"])
cache = oqron_cache.cache("fork", ttl="10s", stale_ttl="1h", resolver=origin, clock=clock)
cache.get("warm")  # the first use, before gunicorn forks


def _handle(path: str, params: dict[str, str]) -> dict[str, Any]:
    if path == "/get":
        return {"value": cache.get(params["key"]), "local": cache.get_stats(local=True)}
    if path == "/delete":
        cache.delete(params["key"])
        return {}
    if path == "/stats":
        return {"cluster": cache.get_stats(), "local": cache.get_stats(local=True)}
    if path == "/tick":
        _offset.value += float(params["seconds"])
        return {"now": clock()}
    if path == "/ping":
        return {}
    raise KeyError(path)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI entry point."""
    params = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    hold = float(params.get("hold", 0))
    status = "200 OK"
    if "only" in params and int(params["only"]) != os.getpid():
        body: dict[str, Any] = {"status": 409}
        status = "409 Conflict"
    else:
        try:
            body = _handle(environ.get("PATH_INFO", "/"), params)
        except KeyError as exc:
            body, status = {"error": f"unknown: {exc}"}, "404 Not Found"
    time.sleep(hold)
    body["pid"] = os.getpid()
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response(status, headers)
    return [data]
