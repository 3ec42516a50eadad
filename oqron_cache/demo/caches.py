"""The demo's caches, declared at import: the module a worker of the demo imports.

``python -m oqron_cache demo`` starts ``celery -A workers worker -l info`` with
``OQRON_CACHE_MODULES=oqron_cache.demo.caches`` (docker compose's ``worker`` service does the
same), so the worker's registry holds the caches the demo's processes read: "demo" and
"demo-swr", with the demo's counting resolver (see
:func:`oqron_cache.demo_resolver.declare_caches`). A refresh task names "demo-swr"; the worker
finds it here and runs its resolver.
"""

from __future__ import annotations

from .resolver import CountingResolver, declare_caches

resolver = CountingResolver()
caches = declare_caches(resolver, shared=True)
main = caches["main"]
swr = caches["swr"]
