"""The standalone worker deployment from a checkout: ``celery -A workers worker -l info``.

The same app as ``celery -A oqron_cache.celery.worker worker`` (which an installed wheel
offers); configured from the environment as :mod:`oqron_cache.celery.worker` says
(``OQRON_REDIS_URL``, ``OQRON_BROKER_URL``, ``OQRON_NAMESPACE``, ``OQRON_CACHE_MODULES``,
``OQRON_VISIBILITY_TIMEOUT``).
"""

from __future__ import annotations

from oqron_cache.celery.worker import app, broker_url, redis_url

__all__ = ["app", "broker_url", "redis_url"]
