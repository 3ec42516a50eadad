"""Old import paths keep working: modules moved into the layered subpackages are found under
their old names too (``import oqron_cache.keys`` gives :mod:`oqron_cache.core.keys`).

A finder at the end of ``sys.meta_path`` (so real modules always win) answers for the names in
:data:`MOVED` with the module now at the new name: the same module object, not a copy, so
``isinstance`` checks and module state agree whichever name imported it. Type checkers do not
see these aliases: import from the new paths in new code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import CodeType, ModuleType

MOVED = {
    "oqron_cache.admin_common": "oqron_cache.admin.common",
    "oqron_cache.admin_inspect": "oqron_cache.admin.inspect",
    "oqron_cache.admin_invalidate": "oqron_cache.admin.invalidate",
    "oqron_cache.admin_stats": "oqron_cache.admin.stats",
    "oqron_cache.breaker": "oqron_cache.core.breaker",
    "oqron_cache.bus": "oqron_cache.redis.bus",
    "oqron_cache.call_keys": "oqron_cache.core.call_keys",
    "oqron_cache.cli": "oqron_cache.admin.cli",
    "oqron_cache.clients": "oqron_cache.redis.clients",
    "oqron_cache.cluster": "oqron_cache.redis.cluster",
    "oqron_cache.conformance": "oqron_cache.testing.conformance",
    "oqron_cache.demo_caches": "oqron_cache.demo.caches",
    "oqron_cache.demo_celery": "oqron_cache.demo.worker",
    "oqron_cache.demo_console": "oqron_cache.demo.console",
    "oqron_cache.demo_helpers": "oqron_cache.demo.helpers",
    "oqron_cache.demo_participant": "oqron_cache.demo.participant",
    "oqron_cache.demo_plan": "oqron_cache.demo.plan",
    "oqron_cache.demo_resolver": "oqron_cache.demo.resolver",
    "oqron_cache.demo_table": "oqron_cache.demo.table",
    "oqron_cache.durations": "oqron_cache.core.durations",
    "oqron_cache.enqueue": "oqron_cache.celery.enqueue",
    "oqron_cache.entry": "oqron_cache.core.entry",
    "oqron_cache.errors": "oqron_cache.core.errors",
    "oqron_cache.flight": "oqron_cache.engine.flight",
    "oqron_cache.flood": "oqron_cache.core.flood",
    "oqron_cache.glob_match": "oqron_cache.core.glob_match",
    "oqron_cache.invalidation": "oqron_cache.engine.invalidation",
    "oqron_cache.keys": "oqron_cache.core.keys",
    "oqron_cache.load": "oqron_cache.engine.load",
    "oqron_cache.metrics": "oqron_cache.core.metrics",
    "oqron_cache.options": "oqron_cache.core.options",
    "oqron_cache.prometheus": "oqron_cache.admin.prometheus",
    "oqron_cache.recovery": "oqron_cache.engine.recovery",
    "oqron_cache.redis_urls": "oqron_cache.redis.urls",
    "oqron_cache.refresh": "oqron_cache.engine.refresh",
    "oqron_cache.registry": "oqron_cache.engine.registry",
    "oqron_cache.serializers": "oqron_cache.core.codecs",
    "oqron_cache.stack": "oqron_cache.engine.stack",
    "oqron_cache.stats_sync": "oqron_cache.engine.stats_sync",
    "oqron_cache.store": "oqron_cache.engine.writes",
    "oqron_cache.task_bodies": "oqron_cache.celery.bodies",
    "oqron_cache.tasks": "oqron_cache.celery.tasks",
    "oqron_cache.tiers": "oqron_cache.engine",
    "oqron_cache.tiers.base": "oqron_cache.engine.tiers",
    "oqron_cache.tiers.memory": "oqron_cache.engine.l1",
    "oqron_cache.tiers.redis": "oqron_cache.redis.store",
    "oqron_cache.tiers.scripts": "oqron_cache.redis.scripts",
    "oqron_cache.write_through": "oqron_cache.celery.write_through",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def get_code(self, fullname: str) -> CodeType | None:
        """The new module's code, for ``python -m <old name>`` (runpy asks for it)."""
        spec = importlib.util.find_spec(self.target)
        loader = spec.loader if spec is not None else None
        get_code = getattr(loader, "get_code", None)
        return get_code(self.target) if get_code is not None else None

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new name is loaded. Importing it under the old
        name gave it the alias's spec; it keeps its own."""
        module.__spec__ = self._spec


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds a moved module under its old name."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())
