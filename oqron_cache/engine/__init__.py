"""One cache in one process: L1, single-flight, the read path and its loads, writes, refresh
dispatcher, invalidation and auto-recovery. Imports ``core`` and ``redis``; never Celery.
"""
