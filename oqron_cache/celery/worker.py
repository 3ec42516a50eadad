"""The standalone worker app: ``celery -A oqron_cache.celery.worker worker -l info``.

Shipped in the wheel (a checkout's ``celery -A workers worker`` is the same app).

Configured from the environment:

* ``OQRON_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``): the cache's Redis, also
  ``redis+sentinel://sentinel1:26379,sentinel2:26379/<service>/<db>`` (see
  :mod:`oqron_cache.clients`).
* ``OQRON_BROKER_URL`` (default: the Redis URL, in Celery's form: a sentinel URL becomes
  kombu's ``sentinel://`` URLs with the ``master_name`` transport option): the Celery broker
  (``redis://``, ``sentinel://`` or ``amqp://``). Required when ``OQRON_REDIS_URL`` is a
  ``redis+cluster://`` URL: kombu cannot use a Redis Cluster as a broker.
* ``OQRON_NAMESPACE`` (default ``oqron``): the key namespace, the same as the web processes'.
* ``OQRON_CACHE_MODULES``: comma-separated modules to import, so their caches (declared with
  ``cache(...)`` or ``@refreshing_cache``) are in this worker's registry. A refresh task names a
  cache; the worker only ever runs caches registered here.
* ``OQRON_VISIBILITY_TIMEOUT`` (seconds, Redis broker only; Celery's default is 3600): how long
  a task taken by a worker that died stays invisible before another worker gets it. Keep it
  above your slowest task and above every cache's ``lock_ttl``.

The app consumes the default queue and the refresh queue (``oqron_cache.refresh``) without
extra flags, sends task events (Flower shows refreshes) and accepts JSON only.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from celery import Celery

import oqron_cache
from oqron_cache.core.errors import ConfigurationError
from oqron_cache.redis.clients import celery_broker, is_cluster_url

redis_url = os.environ.get("OQRON_REDIS_URL", "redis://127.0.0.1:6379/0")
_transport: dict[str, Any]
if os.environ.get("OQRON_BROKER_URL"):
    # A redis+sentinel:// broker URL too becomes kombu's sentinel:// form.
    broker_url, _transport = celery_broker(os.environ["OQRON_BROKER_URL"], "OQRON_BROKER_URL")
elif is_cluster_url(redis_url):
    raise ConfigurationError(
        "OQRON_REDIS_URL is a Redis Cluster, which cannot be the Celery broker (kombu does not "
        "support Redis Cluster): set OQRON_BROKER_URL to a plain Redis, sentinel:// or amqp:// URL"
    )
else:
    # The cache's Redis in Celery's form (a redis+sentinel:// URL becomes kombu's sentinel://).
    broker_url, _transport = celery_broker(redis_url)

app = Celery("oqron_workers", broker=broker_url)
_visibility = os.environ.get("OQRON_VISIBILITY_TIMEOUT")
if _visibility:
    _transport["visibility_timeout"] = float(_visibility)
if _transport:
    app.conf.broker_transport_options = _transport
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,  # acks_late tasks: do not hoard messages a crash would delay
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_modules = os.environ.get("OQRON_CACHE_MODULES", "")
for module in filter(None, (m.strip() for m in _modules.split(","))):
    importlib.import_module(module)

oqron_cache.configure(
    redis_url=redis_url,
    celery_app=app,
    namespace=os.environ.get("OQRON_NAMESPACE") or None,
)
