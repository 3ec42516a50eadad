"""Send oqron_cache tasks by name, as a service that never imports oqron_cache would.

``python tests/procs/send_by_name.py <broker url> '<json list of [task name, args]>'`` sends each
with ``Celery(broker=...).send_task(name, args=args)`` (JSON) and prints one JSON line:
``{"ids": [...], "imported": [...]}``, ``imported`` being the ``oqron_cache`` modules this process
ended up importing (the test expects none). Run it as a script (not ``-m``): only this directory
is on ``sys.path``, so nothing of the repository can be imported by accident.
"""

from __future__ import annotations

import json
import sys

from celery import Celery


def main() -> None:
    broker, calls = sys.argv[1], json.loads(sys.argv[2])
    app = Celery("sender", broker=broker)
    app.conf.update(task_serializer="json", accept_content=["json"])
    ids = [app.send_task(name, args=args).id for name, args in calls]
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "oqron_cache")
    sys.stdout.write(json.dumps({"ids": ids, "imported": imported}) + "\n")


if __name__ == "__main__":
    main()
