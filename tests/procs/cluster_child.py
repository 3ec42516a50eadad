"""A process on a Redis Cluster, for tests/test_cluster.py: ``python -m tests.procs.cluster_child
URL NAMESPACE CACHE``.

It configures the library with ``URL``, declares ``CACHE`` (a long-lived L1 over L2), prints
``ready`` once its bus is subscribed, then answers one command per line on stdin with one JSON
line on stdout:

``get K...``   ``cache.get`` of each key: the values.
``held K...``  for each key, whether this process's L1 holds it.
``delete K...`` ``cache.delete`` of each key: ``null`` once done.
``exit``       exits.
"""

from __future__ import annotations

import json
import sys

import oqron_cache
from oqron_cache.config import current_runtime


def main() -> None:
    url, namespace, name = sys.argv[1:4]
    oqron_cache.configure(redis_url=url, namespace=namespace)
    cache = oqron_cache.cache(name, ttl="10m")
    runtime = current_runtime()
    print(json.dumps({"ready": bool(runtime.bus and runtime.bus.healthy)}), flush=True)
    for line in sys.stdin:
        cmd, *keys = line.split()
        if cmd == "get":
            print(json.dumps([cache.get(k) for k in keys]), flush=True)
        elif cmd == "delete":
            for k in keys:
                cache.delete(k)
            print(json.dumps(None), flush=True)
        elif cmd == "held":
            l1 = cache.stack.l1
            assert l1 is not None
            print(json.dumps([l1.get(k) is not None for k in keys]), flush=True)
        else:
            return


if __name__ == "__main__":
    main()
